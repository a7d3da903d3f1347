"""Benchmark the fine stage: its speed on a large field, and what it recovers of real localizations.

Run from the bundle root::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/benchmark_refiner.py [--quick] [--case speed|real|shapes|all]

Cases:

- **speed**: 10^6 points from a 256×256×64 grid (a simulated 40 × 40 µm field) with ``scripts.networks.fine_stage.refine_grid``
  and the configs' fine-stage network (random weights: the time of a flow step does not depend on them), beside
  the voxel-uniform export ``scripts.data.voxelize.grid_to_points`` of as many points.
- **real**: the real ThunderSTORM acquisition of ``tests/data/ts3d_leterrier_real3d.csv`` split in two halves
  along x; tiles cut from the left half train the fine stage (``configs/train_refiner.json``, real grids only),
  tiles from the right half are voxelized and refined back to points, as many as each tile holds. Reported: the
  W1 distance between the nearest-neighbour distances of the points and of the original localizations of those
  tiles, for the fine stage and for points drawn uniformly inside voxels (probabilistic export), and the same for
  z and local linearity.
- **shapes**: structures that are not filaments, simulated in tiles of the same size: nuclear-pore-like rings
  (eight corners on a 107 nm circle, two rings 50 nm apart in z), bacteria-like shells (points on the surface of
  ellipsoids of 250–450 nm radii) and blobs (Gaussian clusters of σ 20–80 nm), each with 10 nm lateral / 40 nm
  axial localization noise and 3 % background. One fine stage trains on a mix of all three; the table gives the
  same statistics per structure on fresh tiles.

``--quick`` runs both with small sizes and few steps: a smoke check, not a measurement.
"""

import contextlib
import json
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root: benchmarks.common and scripts

from benchmarks import common  # noqa: E402
from benchmarks.common import ROOT, SEED  # noqa: E402

# isort: split
import monai  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import wasserstein_distance  # noqa: E402
from scripts.convert_h5_to_nifti import convert  # noqa: E402
from scripts.data.geometry import GridGeometry  # noqa: E402
from scripts.data.nifti import load_nifti  # noqa: E402
from scripts.data.pointclouds import read_point_clouds, write_point_clouds_h5  # noqa: E402
from scripts.data.tiles import cut_tiles  # noqa: E402
from scripts.data.voxelize import grid_to_points, normalize_, voxelize  # noqa: E402
from scripts.evaluation.metrics import local_shape, nn_distances_nm  # noqa: E402
from scripts.networks.fine_stage import Refiner, offset_scale, refine_grid  # noqa: E402
from scripts.networks.trained import load_refiner_checkpoint, trained_refiner  # noqa: E402
from scripts.simulate_smlm import simulate_microtubules  # noqa: E402

REAL = ROOT / "tests" / "data" / "ts3d_leterrier_real3d.csv"
FULL = {
    "grid": (256, 256, 64),
    "field_nm": (40000.0, 40000.0, 600.0),
    "num_points": 1_000_000,
    "repeat": 3,
    "tiles": (48, 16),
    "tile_nm": [1200.0, 1200.0, 700.0],
    "tile_grid": [16, 16, 16],
    "epochs": 300,
}
QUICK = {
    "grid": (64, 64, 16),
    "field_nm": (10000.0, 10000.0, 600.0),
    "num_points": 20_000,
    "repeat": 1,
    "tiles": (8, 4),
    "tile_nm": [1200.0, 1200.0, 700.0],
    "tile_grid": [8, 8, 8],
    "epochs": 2,
}


def _config_network():
    """The fine stage's network as ``configs/train_refiner.json`` builds it."""
    cfg = json.loads((ROOT / "configs" / "train_refiner.json").read_text())
    return {
        "channels": cfg["refiner_channels"],
        "hidden": cfg["refiner_hidden"],
        "num_layers": cfg["refiner_layers"],
    }, cfg


def speed(cfg):
    network, config = _config_network()
    grid_shape, field = cfg["grid"], np.asarray(cfg["field_nm"])
    geometry = GridGeometry((0.0, 0.0, 0.0), tuple(field), grid_shape)
    area = field[0] * field[1] / 25e6  # in demo fields (5 × 5 µm)
    clouds = simulate_microtubules(
        1,
        seed=SEED,
        box_size_nm=field,
        box_min_nm=(0, 0, 0),
        mean_points=int(10_000 * area),
        filaments_per_cloud=(int(4 * area), int(4 * area)),
    )
    grid = voxelize(clouds[0], geometry, "gaussian", 1.0, "trilinear")[0]
    normalize_(grid, "max")
    torch.manual_seed(SEED)
    refiner = Refiner(**network, offset_scale=offset_scale([1.0, 1.0, 1.0])).eval()
    rows, ours, reference = [], [], []
    peak = 0
    for _ in range(cfg["repeat"]):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        seconds, points = common.timed(
            refine_grid,
            refiner,
            grid,
            geometry,
            cfg["num_points"],
            0.0,
            config["flow_steps"],
            torch.Generator().manual_seed(0),
        )
        peak = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        ours.append(seconds)
        seconds, _ = common.timed(grid_to_points, grid, geometry, "probabilistic", 0.0, cfg["num_points"], rng=0)
        reference.append(seconds)
    assert geometry.inside(points).all() and len(points) == cfg["num_points"]
    rows.append(
        f"| {cfg['num_points']:,} points from a {common.fmt_shape(grid_shape)} grid | voxel-uniform export: "
        f"{min(reference):.2f} s | fine stage ({config['flow_steps']} flow steps, {network}): {min(ours):.2f} s "
        f"(runs {common.fmt_runs(ours, 2)}) | {min(ours) / min(reference):.0f}× the export's time; "
        f"{cfg['num_points'] / min(ours) / 1e3:.0f} k points/s; peak RSS +{peak / 1024:.0f} MiB |"
    )
    return ["## Speed", "", "| case | reference | ours | ratio |", "|---|---:|---:|---|", *rows, ""]


def _real_tiles(cfg):
    """Tiles of the left half (x below the median) for training and of the right half for evaluation."""
    cloud = read_point_clouds(REAL)[0][0]
    left = cloud[:, 0] < np.median(cloud[:, 0])
    train, _ = cut_tiles([cloud[left]], cfg["tiles"][0], cfg["tile_nm"], seed=1, min_points=50)
    test, _ = cut_tiles([cloud[~left]], cfg["tiles"][1], cfg["tile_nm"], seed=2, min_points=50)
    return train, test


def _noisy(points, rng, box, background=0.03):
    """Localization noise (10 nm lateral, 40 nm axial) and a uniform background over ``box``."""
    points = points + rng.normal(0.0, (10.0, 10.0, 40.0), points.shape)
    n_background = int(background * len(points))
    return np.concatenate([points, rng.uniform(0.0, box, (n_background, 3))])


def simulate_shape(kind, box, rng):
    """One tile of a structure that is not a filament (see the module docstring), clipped to ``box`` (nm)."""
    box = np.asarray(box, float)
    margin = np.array([150.0, 150.0, 120.0])
    parts = []
    if kind == "pores":
        corners = 2 * np.pi * np.arange(8) / 8
        for centre in rng.uniform(margin, box - margin, (int(rng.integers(25, 45)), 3)):
            for dz in (-25.0, 25.0):
                ring = np.stack([53.5 * np.cos(corners), 53.5 * np.sin(corners), np.full(8, dz)], 1)
                labelled = ring[rng.random(8) < 0.7]  # incomplete labelling, as in real pores
                parts.append(np.repeat(centre + labelled, rng.poisson(12, len(labelled)) + 1, axis=0))
    elif kind == "shells":
        for centre in rng.uniform(margin, box - margin, (int(rng.integers(2, 5)), 3)):
            radii = np.array([rng.uniform(250, 450), rng.uniform(250, 450), rng.uniform(150, 250)])
            directions = rng.normal(size=(int(rng.integers(800, 1600)), 3))
            directions /= np.linalg.norm(directions, axis=1, keepdims=True)
            parts.append(centre + directions * radii)
    elif kind == "blobs":
        for centre in rng.uniform(margin, box - margin, (int(rng.integers(8, 20)), 3)):
            sigma = rng.uniform(20, 80)
            parts.append(centre + rng.normal(0.0, (sigma, sigma, max(sigma, 40.0)), (int(rng.integers(60, 250)), 3)))
    else:
        raise ValueError(kind)
    points = _noisy(np.concatenate(parts), rng, box)
    return points[np.all((points >= 0) & (points < box), axis=1)]


SHAPES = ("pores", "shells", "blobs")


def _shape_tiles(cfg):
    rng = np.random.default_rng(SEED)
    n_train, n_test = cfg["tiles"]
    train = [simulate_shape(SHAPES[i % 3], cfg["tile_nm"], rng) for i in range(n_train)]
    test = [simulate_shape(SHAPES[i % 3], cfg["tile_nm"], rng) for i in range(n_test)]
    return train, test, [SHAPES[i % 3] for i in range(n_test)]


def _conversion(work, cfg, train, test):
    """One conversion folder: ``train/`` from the training tiles, ``val/`` from the evaluation tiles, one box."""
    for name, clouds, seed in (("left", train, 1), ("right", test, 2)):
        write_point_clouds_h5(work / f"{name}.h5", clouds)
        with contextlib.redirect_stdout(sys.stderr):  # the converter's summary line: keep the report clean
            convert(
                work / f"{name}.h5",
                work / name,
                voxel_size=cfg["tile_grid"],
                train_ratio=1.0,
                volume_dims=cfg["tile_nm"],
                seed=seed,
            )
    data = work / "tiles"
    (data / "val").mkdir(parents=True)
    shutil.copytree(work / "left" / "train", data / "train")
    for path in sorted((work / "right" / "train").iterdir()):
        shutil.copy(path, data / "val" / path.name.replace("train_", "val_"))
    shutil.copy(work / "left" / "train_points.h5", data / "train_points.h5")
    shutil.copy(work / "right" / "train_points.h5", data / "val_points.h5")
    shutil.copy(work / "left" / "dataset_info.json", data / "dataset_info.json")
    return data


def _train_and_refine(cfg, work, train, test):
    """Train the fine stage on the training tiles' grids (real grids only), then refine every evaluation grid to
    as many points as its tile holds. Returns the sets of clouds, the training seconds and the voxel spacing."""
    data = _conversion(work, cfg, train, test)
    overrides = {
        "dataset_dir": str(data),
        "use_reconstructions": False,
        "ckpt_dir": str(work / "refiner"),
        "log_dir": str(work / "logs"),
        "n_epochs": cfg["epochs"],
        "batch_size": 8,
        "val_interval": cfg["epochs"],
        "num_workers": 0,
    }
    start = time.perf_counter()
    common.run_workflow(common.open_workflow(ROOT / "configs" / "train_refiner.json", overrides))
    train_seconds = time.perf_counter() - start
    checkpoint = load_refiner_checkpoint(work / "refiner" / "latest_checkpoint.pt")
    refiner = trained_refiner(checkpoint, work / "refiner" / "latest_checkpoint.pt")
    clouds = read_point_clouds(data / "val_points.h5")[0]
    grids = [load_nifti(p) for p in sorted((data / "val").glob("*.nii.gz"))]
    sets = {"original": clouds, "fine stage": [], "voxel-uniform": []}
    for i, ((grid, geometry), cloud) in enumerate(zip(grids, clouds)):
        sets["fine stage"].append(
            refine_grid(
                refiner,
                grid,
                geometry,
                len(cloud),
                0.0,
                checkpoint["sampling"]["flow_steps"],
                torch.Generator().manual_seed(i),
            )
        )
        sets["voxel-uniform"].append(grid_to_points(grid, geometry, "probabilistic", 0.0, len(cloud), rng=i))
    spacing = GridGeometry.from_dict(json.loads((data / "dataset_info.json").read_text())["geometry"]).spacing_nm
    return sets, train_seconds, spacing


def _statistics(sets, keep=None):
    """Pooled NN distances, z and linearity of each set's clouds (those whose index ``keep`` allows)."""
    stats = {}
    for name, clouds in sets.items():
        chosen = [c for i, c in enumerate(clouds) if keep is None or keep(i)]
        stats[name] = {
            "nn": np.concatenate([nn_distances_nm(c) for c in chosen]),
            "z": np.concatenate([c[:, 2] for c in chosen]),
            "linearity": np.concatenate([local_shape(c, 150, rng=0)[0] for c in chosen]),
        }
    return stats


def _rows(stats, label=""):
    rows, w1 = [], {}
    for name in ("fine stage", "voxel-uniform"):
        w1[name] = {k: wasserstein_distance(stats[name][k], stats["original"][k]) for k in ("nn", "z", "linearity")}
        rows.append(
            f"| {label}{name} | {stats[name]['nn'].mean():.1f} (original {stats['original']['nn'].mean():.1f}) | "
            f"{w1[name]['nn']:.2f} | {w1[name]['z']:.2f} | {w1[name]['linearity']:.3f} |"
        )
    return rows, w1["fine stage"]["nn"] / w1["voxel-uniform"]["nn"]


HEADER = [
    "| points | mean NN distance (nm) | NN distance W1 (nm) | z W1 (nm) | linearity W1 |",
    "|---|---:|---:|---:|---:|",
]


def real(cfg, work):
    train, test = _real_tiles(cfg)
    sets, train_seconds, spacing = _train_and_refine(cfg, work, train, test)
    rows, ratio = _rows(_statistics(sets))
    return [
        "## Real localizations, refined back",
        "",
        f"{REAL.name}: {len(train)} training and {len(test)} evaluation tiles of {common.fmt_shape(cfg['tile_grid'])} "
        f"voxels of {common.fmt_shape(np.round(spacing, 1))} nm, {sum(map(len, sets['original']))} localizations in "
        f"the evaluation tiles; trained {cfg['epochs']} epochs ({train_seconds:.0f} s).",
        "",
        *HEADER,
        *rows,
        "",
        f"NN-distance W1, fine stage / voxel-uniform: {ratio:.2f}.",
        "",
    ]


def shapes(cfg, work):
    train, test, kinds = _shape_tiles(cfg)
    sets, train_seconds, spacing = _train_and_refine(cfg, work, train, test)
    lines = [
        "## Structures that are not filaments",
        "",
        f"{len(train)} training and {len(test)} evaluation tiles, a third each of {', '.join(SHAPES)}, of "
        f"{common.fmt_shape(cfg['tile_grid'])} voxels of {common.fmt_shape(np.round(spacing, 1))} nm; "
        f"trained {cfg['epochs']} epochs ({train_seconds:.0f} s).",
        "",
        *HEADER,
    ]
    ratios = []
    for kind in SHAPES:
        rows, ratio = _rows(_statistics(sets, keep=lambda i: kinds[i] == kind), f"{kind}: ")
        lines += rows
        ratios.append(f"{kind} {ratio:.2f}")
    return lines + ["", f"NN-distance W1, fine stage / voxel-uniform: {', '.join(ratios)}.", ""]


def main():
    parser = common.arg_parser(__doc__, "small sizes, few steps: a smoke check", tmpdir="tiles and checkpoints")
    parser.add_argument("--case", choices=("speed", "real", "shapes", "all"), default="all")
    parser.add_argument("--repeat", type=int, default=None)
    args = parser.parse_args()
    cfg = common.pick_config(args, QUICK, FULL)
    load = common.load_average()
    modules = (torch, monai, np)
    header = common.machine_header(
        "Fine stage benchmark", args.quick, load, modules, torch_info=True, method="Fine stage"
    )
    print("\n".join(header))
    if args.case in ("speed", "all"):
        print("\n".join(speed(cfg)), flush=True)
    for name, case in (("real", real), ("shapes", shapes)):
        if args.case in (name, "all"):
            with common.work_folder(__file__, args.tmpdir) as work:
                print("\n".join(case(cfg, work)), flush=True)


if __name__ == "__main__":
    main()
