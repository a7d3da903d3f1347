"""Benchmark the stage-2 recipe: each change against the anchors' recipes, measured on the samples.

Run from the bundle root, after the demo (it reuses the demo's data, autoencoder and fine stage)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/benchmark_recipe.py [--demo_dir D] [--quick]

Rows, each adding one change to the row above, every other setting the demo's (``scripts/run_demo.py``):

1. MONAI's 3D LDM tutorial: DDPM noise prediction (scaled-linear betas 0.0015–0.0195), no EMA, no augmentation,
   a constant learning rate; sampled with DDIM;
2. + rectified flow (MONAI's MAISI bundle), sampled with Euler steps;
3. + the exponential moving average of the UNet's weights;
4. + flips and 90° rotations (every one encoded once through the latent cache);
5. + learning-rate warm-up and cosine decay (the bundle's recipe).

Each row trains stage 2 for the demo's epochs, samples 100 clouds (points placed by the demo's fine stage) and
evaluates them against the demo's 100 test clouds (the floor and the mean-grid baseline for reference).
"""

import inspect
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root: benchmarks.common and scripts

from benchmarks import common  # noqa: E402
from benchmarks.common import ROOT  # noqa: E402

# isort: split
import monai  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scripts import run_demo  # noqa: E402

ANCHOR = {
    "objective": "ddpm",
    "ema_decay": 0.0,
    "flip_x": "false",
    "flip_y": "false",
    "rotate_z": "false",
    "lr_warmup_fraction": 0.0,
    "lr_decay": "false",
}
STEPS = [
    ("3D LDM tutorial (DDPM, DDIM sampling)", {}),
    ("+ rectified flow (MAISI)", {"objective": "rflow"}),
    ("+ EMA of the UNet", {"ema_decay": 0.999}),
    ("+ flips and rotations", {"flip_x": "true", "flip_y": "true", "rotate_z": "true"}),
    ("+ warm-up and cosine decay", {"lr_warmup_fraction": 0.05, "lr_decay": "true"}),
]


def run_row(work, k, settings, data, outputs, epochs, seed):
    """Train row ``k``'s stage 2 with ``settings`` on the demo's data and autoencoder, sample it and score it:
    ``(training minutes, the evaluation's rows)``."""
    models = work / f"row{k}"
    (models / "autoencoder").mkdir(parents=True)
    (models / "autoencoder" / "best_model.pt").symlink_to((outputs / "autoencoder" / "best_model.pt").resolve())
    (models / "refiner").mkdir()
    (models / "refiner" / "best_model.pt").symlink_to((outputs / "refiner" / "best_model.pt").resolve())
    start = time.perf_counter()
    run_demo.bundle_step(
        "train_diffusion.json",
        {
            **run_demo.DIFFUSION,
            **settings,
            "dataset_dir": data / "voxels_nifti",
            "n_epochs": epochs,
            "val_interval": min(epochs, run_demo.DIFFUSION["val_interval"]),  # best_model.pt in short runs too
            "ckpt_dir": models / "diffusion",
            "log_dir": work / f"logs{k}",
            "seed": seed,
            "autoencoder_path": models / "autoencoder" / "best_model.pt",
        },
    )
    minutes = (time.perf_counter() - start) / 60
    run_demo.bundle_step(
        "inference.json",
        {
            "model_dir": models,
            "output_dir": work / f"samples{k}",
            "num_samples": 100,
            "batch_size": 10,
            "seed": seed,
            **({"num_inference_steps": 50} if settings["objective"] == "ddpm" else common.EULER_SAMPLING),
        },
    )
    run_demo.bundle_step(
        "evaluate.json",
        {
            "dataset_dir": data / "voxels_nifti",
            "samples_dir": work / f"samples{k}",
            "model_dir": models,
            "output_dir": work / f"eval{k}",
            "emd_points": 0,
            "num_workers": 2,
            "reference_file": data / "test_clouds.h5",
            "sets": "['train_vs_heldout','mean_grid_baseline','samples']",
        },
    )
    rows = json.loads((work / f"eval{k}" / "metrics.json").read_text())["rows"]
    return minutes, rows


def main():
    parser = common.arg_parser(__doc__, "two epochs per row: a smoke check", tmpdir="stage-2 runs")
    parser.add_argument("--demo_dir", default=None, help="the demo's output_dir (default: the bundle's demo folders)")
    parser.add_argument("--epochs", type=int, default=None, help="stage-2 epochs per row (default: the demo's)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of stage 2's training and sampling")
    parser.add_argument("--rows", default=None, help="only these rows (1-based, comma separated; default: all)")
    args = parser.parse_args()
    load = common.load_average()
    base = Path(args.demo_dir) if args.demo_dir else None
    data, outputs = (base / "data", base / "outputs") if base else (ROOT / "data/demo", ROOT / "outputs/demo")
    epochs = args.epochs or (
        2 if args.quick else inspect.signature(run_demo.run_demo).parameters["diffusion_epochs"].default
    )
    results = []
    settings = dict(ANCHOR)
    with common.work_folder(__file__, args.tmpdir) as work:
        chosen = [int(r) - 1 for r in args.rows.split(",")] if args.rows else range(len(STEPS))
        for k, (label, change) in enumerate(STEPS):
            settings.update(change)
            if k not in chosen:
                continue
            minutes, rows = run_row(work, k, settings, data, outputs, epochs, args.seed)
            results.append((label, minutes, rows))
    lines = common.machine_header(
        "Stage-2 recipe, one change at a time", args.quick, load, (torch, monai, np), torch_info=True
    )
    lines += [
        f"Stage 2 trained for {epochs} epochs per row on the demo's data and autoencoder (seed {args.seed}); 100 "
        "samples through the demo's fine stage against the demo's 100 test clouds.",
        "",
        "| recipe | stage-2 minutes | " + " | ".join(name for name, *_ in run_demo.SUMMARY) + " |",
        "|---|---:|" + "---:|" * len(run_demo.SUMMARY),
    ]

    for label, minutes, rows in results:
        lines.append(f"| {label} | {minutes:.1f} | {run_demo.summary_cells(rows['samples'])} |")
    lines.append(f"| floor: training clouds | – | {run_demo.summary_cells(results[-1][2]['train_vs_heldout'])} |")
    lines.append(f"| mean-grid baseline | – | {run_demo.summary_cells(results[-1][2]['mean_grid_baseline'])} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
