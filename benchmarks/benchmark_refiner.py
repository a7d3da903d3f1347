"""Benchmark the fine stage: its speed on a large field, and what it recovers of real localizations.

Run from the bundle root::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/benchmark_refiner.py [--quick] [--case speed|real|all]

Cases:

- **speed**: 10^6 points from a 256×256×64 grid (a simulated 40 × 40 µm field) with ``scripts.refiner.refine_grid``
  and the configs' fine-stage network (random weights: the time of a flow step does not depend on them), beside
  the voxel-uniform export ``scripts.voxelize.grid_to_points`` of as many points.
- **real**: the real ThunderSTORM acquisition of ``tests/data/ts3d_leterrier_real3d.csv`` split in two halves
  along x; tiles cut from the left half train the fine stage (``configs/train_refiner.json``, real grids only),
  tiles from the right half are voxelized and refined back to points, as many as each tile holds. Reported: the
  W1 distance between the nearest-neighbour distances of the points and of the original localizations of those
  tiles, for the fine stage and for points drawn uniformly inside voxels (probabilistic export), and the same for
  z and local linearity.

``--quick`` runs both with small sizes and few steps: a smoke check, not a measurement.
"""

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

from scripts.convert_h5_to_nifti import convert, cut_tiles  # noqa: E402
from scripts.geometry import GridGeometry  # noqa: E402
from scripts.metrics import local_shape, nn_distances_nm  # noqa: E402
from scripts.pointcloud_io import read_point_clouds, write_point_clouds_h5  # noqa: E402
from scripts.refiner import Refiner, load_refiner_checkpoint, offset_scale, refine_grid, trained_refiner  # noqa: E402
from scripts.simulate_smlm import simulate_microtubules  # noqa: E402
from scripts.volume_io import load_nifti  # noqa: E402
from scripts.voxelize import grid_to_points, normalize_, voxelize  # noqa: E402

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


def _split_tiles(work, cfg):
    """Tiles of the left half (x below the median) for training and of the right half for evaluation, as one
    conversion folder (``train/`` from the left, ``val/`` from the right; all tiles re-origined to the same box)."""
    cloud = read_point_clouds(REAL)[0][0]
    left = cloud[:, 0] < np.median(cloud[:, 0])
    parts = {}
    for name, half, n, seed in (("left", cloud[left], cfg["tiles"][0], 1), ("right", cloud[~left], cfg["tiles"][1], 2)):
        tiles, _ = cut_tiles([half], n, cfg["tile_nm"], seed=seed, min_points=50)
        write_point_clouds_h5(work / f"{name}.h5", tiles)
        parts[name] = convert(
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


def real(cfg, work):
    from monai.bundle import ConfigWorkflow

    data = _split_tiles(work, cfg)
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
    with common.monai_logs_to_stderr():
        workflow = ConfigWorkflow(
            config_file=str(ROOT / "configs" / "train_refiner.json"), workflow_type="train", **overrides
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()
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
    stats = {}
    for name, cl in sets.items():
        stats[name] = {
            "nn": np.concatenate([nn_distances_nm(c) for c in cl]),
            "z": np.concatenate([c[:, 2] for c in cl]),
            "linearity": np.concatenate([local_shape(c, 150, rng=0)[0] for c in cl]),
        }
    rows = []
    for name in ("fine stage", "voxel-uniform"):
        w1 = {k: wasserstein_distance(stats[name][k], stats["original"][k]) for k in ("nn", "z", "linearity")}
        rows.append(
            f"| {name} | {stats[name]['nn'].mean():.1f} | {w1['nn']:.2f} | {w1['z']:.2f} | {w1['linearity']:.3f} |"
        )
    ratio = wasserstein_distance(stats["fine stage"]["nn"], stats["original"]["nn"]) / wasserstein_distance(
        stats["voxel-uniform"]["nn"], stats["original"]["nn"]
    )
    spacing = GridGeometry.from_dict(json.loads((data / "dataset_info.json").read_text())["geometry"]).spacing_nm
    return [
        "## Real localizations, refined back",
        "",
        f"{REAL.name}: {cfg['tiles'][0]} training tiles from the left half, {cfg['tiles'][1]} evaluation tiles from "
        f"the right half, {common.fmt_shape(cfg['tile_grid'])} voxels of {common.fmt_shape(np.round(spacing, 1))} nm; "
        f"{sum(map(len, clouds))} original localizations in the evaluation tiles (mean NN distance "
        f"{stats['original']['nn'].mean():.1f} nm); the fine stage trained for {cfg['epochs']} epochs "
        f"({train_seconds:.0f} s).",
        "",
        "| points | mean NN distance (nm) | NN distance W1 (nm) | z W1 (nm) | linearity W1 |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"NN-distance W1, fine stage / voxel-uniform: {ratio:.2f}.",
        "",
    ]


def main():
    parser = common.arg_parser(__doc__, "small sizes, few steps: a smoke check", tmpdir="tiles and checkpoints")
    parser.add_argument("--case", choices=("speed", "real", "all"), default="all")
    parser.add_argument("--repeat", type=int, default=None)
    args = parser.parse_args()
    cfg = common.pick_config(args, QUICK, FULL)
    load = common.load_average()
    lines = []
    if args.case in ("speed", "all"):
        lines += speed(cfg)
    if args.case in ("real", "all"):
        with common.work_folder(__file__, args.tmpdir) as work:
            lines += real(cfg, work)
    header = common.machine_header("Fine stage benchmark", args.quick, load, (torch, monai, np), torch_info=True)
    print("\n".join(header + lines))


if __name__ == "__main__":
    main()
