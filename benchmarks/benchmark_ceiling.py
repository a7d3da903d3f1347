"""The ceiling of stage 2: what the samples would score if stage 2 drew the test clouds' own grids.

A perfect stage 2 draws grids of the data's distribution; its samples then reach the points through the same
decoder and fine stage. So the shipped autoencoder and fine stage are scored here on the grids of fresh test clouds
of the demo's simulator (seed 1, which no training used), against those clouds::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/benchmark_ceiling.py --work_dir ~/runs/ceiling [--refiner R.pt ...]

Rows: the simulator's other clouds (seed 2: the floor); points uniform inside the voxels of the real grids; the
fine stage on the real grids (the fine stage's own limit); the fine stage on the autoencoder's reconstructions of
those grids, put on the training grids' scale as the sampler puts decoded grids (the ceiling of stage 2).
``--refiner`` adds the two fine-stage rows of other fine-stage checkpoints (trained for the same box and voxel
size), so a fine stage can be compared with the shipped one in one run; each row names its fine stage by its
training (epochs, training clouds).
Statistics as in ``configs/evaluate.json`` (W1 to the test clouds' pooled distributions, the realism test) and the
model card's targets. ``--quick``: 8 clouds.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root: benchmarks.common and scripts

from benchmarks import benchmark_stage2_scaling as scaling  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.common import ROOT  # noqa: E402

N_CLOUDS, N_QUICK = 100, 8
RADIUS_NM, PAIR_RANGE_NM, FOLDS = 150.0, (20.0, 500.0), 5  # configs/evaluate.json's defaults
COLUMNS = ("NN W1 (nm)", "z W1 (nm)", "linearity W1", "pair W1 (nm)", "C2ST %", "linearity / planarity mean")
COLUMNS += ("across (nm) / narrowest axis z share, means",)
TARGETS = ("≤ 3", "≤ 5", "", "≤ 3", "≤ 65")  # and linearity / planarity means within 0.05 / 0.03 of the test clouds'


def grids_of(clouds, dataset_info, voxel_size):
    """The grids the converter would have made of ``clouds``, resized to the autoencoder's ``voxel_size``."""
    from scripts.data.datasets import resize_grid
    from scripts.data.voxelize import voxelize_like

    return [resize_grid(voxelize_like(c, dataset_info), tuple(voxel_size)) for c in clouds]


def reconstructions(autoencoder, grids):
    import numpy as np
    import torch

    with torch.no_grad():
        batch = torch.from_numpy(np.stack(grids))[:, None]
        return list(autoencoder.reconstruct(batch).float().clamp(0, 1)[:, 0].numpy())


def refined(refiner, checkpoint, grids, geometry, points_per_mass):
    """The fine stage's points of each grid, as many as the training data's density gives (seeded per grid), from
    the voxels above the threshold it was trained with (the sampler's default)."""
    import torch
    from scripts.networks.fine_stage import refine_grid, sampling_settings

    out, (steps, threshold) = [], sampling_settings(checkpoint)
    for i, grid in enumerate(grids):
        generator = torch.Generator().manual_seed(i)
        out.append(
            refine_grid(refiner, grid, geometry, None, threshold, steps, generator, points_per_mass=points_per_mass)
        )
    return out


def voxel_uniform(grids, geometry, points_per_mass):
    import numpy as np
    from scripts.data.voxelize import EXPORT_THRESHOLD, grid_to_points

    return [
        grid_to_points(
            g, geometry, "probabilistic", EXPORT_THRESHOLD, None, points_per_mass, rng=np.random.default_rng(i)
        )
        for i, g in enumerate(grids)
    ]


def score(clouds, reference):
    """The table's cells of ``clouds`` against ``reference`` (``(statistics, features)`` of the test clouds), and
    the realism test's accuracy on each statistic alone."""
    import numpy as np
    from scripts.evaluation.metrics import compare_distributions
    from scripts.evaluation.realism import classifier_two_sample_test, realism_by_statistic, set_statistics

    stats, features = set_statistics(clouds, RADIUS_NM, PAIR_RANGE_NM, np.random.default_rng(1))
    w1 = {k: compare_distributions(stats[k], reference[0][k])["wasserstein"] for k in stats}
    folds = min(FOLDS, len(clouds))
    c2st = classifier_two_sample_test(features, reference[1], folds, 0)["accuracy"]
    by_statistic = realism_by_statistic(features, reference[1], folds, 0)
    cells = (
        f"{w1['nn_distance_nm']:.2f}",
        f"{w1['z_nm']:.1f}",
        f"{w1['linearity']:.3f}",
        f"{w1['pair_distance_nm']:.1f}",
        f"{100 * c2st:.1f}",
        f"{np.mean(stats['linearity']):.2f} / {np.mean(stats['planarity']):.2f}",
        f"{np.mean(stats['cross_section_nm']):.1f} / {np.mean(stats['narrow_axis_z']):.2f}",
    )
    return cells, by_statistic


def render_strip(rows, path, n=4):
    """The first ``n`` clouds of each row, one row of renders per set, the test clouds first (one scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scripts.evaluation.rendering import render_points

    box_min, box_max = rows[0][2], rows[0][3]
    xy, z = ((box_min[0], box_max[0]), (box_min[1], box_max[1])), (box_min[2], box_max[2])
    fig, axes = plt.subplots(len(rows), n, figsize=(3 * n, 3.2 * len(rows)), squeeze=False)
    for r, (label, clouds, *_) in enumerate(rows):
        for j in range(n):
            axes[r, j].imshow(render_points(clouds[j], 15.0, xy_range=xy, z_range=z)[0])
            axes[r, j].set_axis_off()
        axes[r, 0].set_title(label, loc="left", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main():
    parser = common.arg_parser(__doc__, f"{N_QUICK} clouds: a smoke check")
    parser.add_argument("--work_dir", required=True, help="where the simulated clouds are kept (reused)")
    parser.add_argument("--model_dir", default=str(ROOT / "models"), help="the autoencoder and fine stage")
    parser.add_argument("--refiner", nargs="*", default=[], help="other fine-stage checkpoints to compare")
    parser.add_argument("--figure", default=None, help="a PNG: renders of the test clouds above each row's")
    args = parser.parse_args()
    import numpy as np
    from scripts.data.geometry import GridGeometry
    from scripts.data.pointclouds import read_point_clouds
    from scripts.data.voxelize import as_training_grid
    from scripts.evaluation.realism import set_statistics
    from scripts.evaluation.report import by_statistic_table
    from scripts.networks import trained
    from scripts.networks.fine_stage import sampling_background
    from scripts.runtime.errors import UserError

    n = N_QUICK if args.quick else N_CLOUDS
    models = Path(args.model_dir).resolve()
    ae_path = trained.checkpoint_path(models, "autoencoder")
    refiner_paths = [trained.checkpoint_path(models, "refiner"), *args.refiner]
    try:  # every checkpoint read before any work, so a wrong path costs no minutes
        ae_ckpt = trained.load_autoencoder_checkpoint(ae_path)
        fine_stages = [(path, trained.load_refiner_checkpoint(path)) for path in refiner_paths]
    except UserError as e:
        parser.error(str(e))
    autoencoder = trained.frozen_autoencoder(ae_ckpt, ae_path, "cpu")
    work = Path(args.work_dir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    log, load = work / "commands.log", common.load_average()
    info = ae_ckpt["dataset_info"]
    geometry = GridGeometry.from_dict(info["geometry"])
    points_per_mass = info["points_per_mass"]["mean"]
    clouds = {}
    for name, seed in (("test", 1), ("other", 2)):
        path = work / f"clouds_seed{seed}_{n}.h5"
        scaling.simulate(path, n, seed, log)
        clouds[name] = [c[geometry.inside(c)] for c in read_point_clouds(path)[0]]
    reference = set_statistics(clouds["test"], RADIUS_NM, PAIR_RANGE_NM, np.random.default_rng(0))
    grids = grids_of(clouds["test"], info, ae_ckpt["voxel_size"])
    recon = reconstructions(autoencoder, grids)
    rows = [
        ("test clouds (seed 1)", clouds["test"]),
        ("floor: the simulator's other clouds (seed 2)", clouds["other"]),
        ("points uniform inside the real grids' voxels", voxel_uniform(grids, geometry, points_per_mass)),
    ]
    for i, (path, ckpt) in enumerate(fine_stages):
        refiner = trained.trained_refiner(ckpt, path)
        trained_for = f"{ckpt['epoch']} epochs, {ckpt['dataset_info']['counts']['n_train']} clouds"
        prefix = "" if i else "shipped " if models == ROOT / "models" else "the model_dir's "
        name = f"{prefix}fine stage ({trained_for})"
        rows.append((f"{name} on the real grids", refined(refiner, ckpt, grids, geometry, points_per_mass)))
        level = sampling_background(ckpt)
        on_scale = [as_training_grid(g, info, level) for g in recon]  # as the sampler puts decoded grids
        ceiling = refined(refiner, ckpt, on_scale, geometry, points_per_mass)
        rows.append((f"{name} on their reconstructions (the ceiling)", ceiling))
        print(f"scored {name}", file=sys.stderr, flush=True)
    import monai
    import torch

    linearity, planarity, across, tilt = (
        np.mean(reference[0][k]) for k in ("linearity", "planarity", "cross_section_nm", "narrow_axis_z")
    )
    lines = common.machine_header("The ceiling of stage 2", args.quick, load, (torch, monai, np), torch_info=True)
    lines += [
        f"{n} test clouds of the demo's simulator (seed 1), their grids as the converter makes them, the autoencoder "
        f"and fine stage of {models}; W1 against the test clouds' pooled statistics.",
        "",
        "| points | " + " | ".join(COLUMNS) + " |",
        "|---" + "|---:" * (len(COLUMNS) - 2) + "|---|---|",
        "| target (model card) | "
        + " | ".join(TARGETS)
        + f" | {linearity:.2f} ± 0.05 / {planarity:.2f} ± 0.03 |"
        + f" the test clouds': {across:.1f} / {tilt:.2f} |",
    ]
    scores = [(label, *score(c, reference)) for label, c in rows[1:]]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells, _ in scores]
    lines += [
        "",
        "The C2ST on each statistic alone (%; 50: that statistic matches the test clouds', 100: it alone gives the "
        "set away):",
        "",
        *by_statistic_table("points", [(label, by) for label, _, by in scores]),
    ]
    report = "\n".join(lines)
    (work / "report.md").write_text(report + "\n")
    print(report)
    if args.figure:
        render_strip([(label, c, geometry.box_min_nm, geometry.box_max_nm) for label, c in rows], Path(args.figure))


if __name__ == "__main__":
    main()
