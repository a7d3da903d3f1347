"""Benchmark sampling steps: fidelity against seconds per sample, rectified flow against DDPM/DDIM.

Run from the bundle root after the demo (it reuses the demo's data, autoencoder and fine stage)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/benchmark_steps.py [--demo_dir D] [--seeds 3] [--quick]

Both objectives are trained with the demo's stage-2 recipe and budget (``scripts/run_demo.py``), changing only
``objective``: ``ddpm`` (noise prediction, MONAI's 3D LDM tutorial) and ``rflow`` (velocity, MONAI's MAISI). Each
sampler then draws 100 clouds (points placed by the demo's fine stage), evaluated against the demo's 100 test clouds:
DDPM-1000, DDIM-10/25/50 on the ddpm model; RFlow-5/10/30 on the rflow model. DDIM-50 and RFlow-10 are sampled
with ``--seeds`` seeds: their spread is each metric's run-to-run spread, against which "equal quality" is judged.

Seconds per sample: noise → denoising → decode (``scripts.networks.schedulers.sample_grids``), a batch of 10 timed in
process on this machine, without the fine stage's point placement (the same for every sampler).
"""

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

SAMPLERS = {
    "ddpm": [("DDPM", 1000), ("DDIM", 10), ("DDIM", 25), ("DDIM", 50)],
    "rflow": [("RFlow", s) for s in (5, 10, 30)],
}
REPEATED = {("DDIM", 50), ("RFlow", 10)}  # sampled with every seed: the spread
# RFlow's deterministic steps, as the card's table was measured
EULER = {"RFlow": {"eta": common.EULER_SAMPLING["eta"]}}
# the demo's table, with the foreground fraction as its gap to the test clouds' (what "equal quality" compares)
METRICS = [(name, key, field, scale) for name, key, field, scale, _ in run_demo.SUMMARY if key != "foreground_fraction"]
METRICS.append(("foreground gap (pp)", "foreground_fraction", "gap", 100))


def train(objective, data, outputs, work, epochs, seed):
    """A stage-2 model of ``objective`` on the demo's autoencoder, in the layout inference reads, and its training
    minutes; the demo's own stage 2 is reused where it is this run (rflow, these epochs: ``None`` minutes)."""
    from scripts.networks.checkpoints import load_checkpoint

    models = work / objective
    for stage in ("autoencoder", "refiner"):
        (models / stage).mkdir(parents=True)
        (models / stage / "best_model.pt").symlink_to((outputs / stage / "best_model.pt").resolve())
    demo, latest = outputs / "diffusion" / "best_model.pt", outputs / "diffusion" / "latest_checkpoint.pt"
    if demo.is_file() and latest.is_file() and seed == 0:
        ckpt = load_checkpoint(latest)
        if ckpt["scheduler"].get("objective") == objective and ckpt["epoch"] == epochs:
            (models / "diffusion").mkdir()
            (models / "diffusion" / "best_model.pt").symlink_to(demo.resolve())
            return models, None
    start = time.perf_counter()
    run_demo.bundle_step(
        "train_diffusion.json",
        {
            **run_demo.DIFFUSION,
            "objective": objective,
            "dataset_dir": data / "voxels_nifti",
            "n_epochs": epochs,
            "val_interval": min(epochs, run_demo.DIFFUSION["val_interval"]),
            "ckpt_dir": models / "diffusion",
            "log_dir": work / f"logs_{objective}",
            "seed": seed,
            "autoencoder_path": models / "autoencoder" / "best_model.pt",
        },
    )
    return models, (time.perf_counter() - start) / 60


def seconds_per_sample(models, kind, steps, batch=10):
    """Denoising and decoding of ``batch`` samples, timed once after a warm-up of one step."""
    from scripts.networks.precision import autocast_dtype
    from scripts.networks.schedulers import make_scheduler, sample_grids
    from scripts.networks.trained import (
        frozen_autoencoder,
        load_autoencoder_checkpoint,
        load_diffusion_checkpoint,
        trained_unet,
    )

    ae_path, df_path = models / "autoencoder" / "best_model.pt", models / "diffusion" / "best_model.pt"
    ae_ckpt = load_autoencoder_checkpoint(ae_path)
    ckpt = load_diffusion_checkpoint(df_path, ae_ckpt, ae_path)
    autoencoder, unet = frozen_autoencoder(ae_ckpt, ae_path, "cpu"), trained_unet(ckpt, df_path, "cpu")
    amp = autocast_dtype("cpu", True)
    args = (autoencoder, unet)
    shape, scale = tuple(ckpt["latent_shape"]), ckpt["scale_factor"]
    euler = EULER.get(kind, {})
    sample_grids(*args, make_scheduler(ckpt["scheduler"], kind, 1, **euler), scale, shape, batch, "cpu", None, amp)
    start = time.perf_counter()
    sample_grids(*args, make_scheduler(ckpt["scheduler"], kind, steps, **euler), scale, shape, batch, "cpu", None, amp)
    return (time.perf_counter() - start) / batch


def sample_and_evaluate(models, kind, steps, seed, data, work, num_samples):
    tag = f"{kind}{steps}_s{seed}"
    run_demo.bundle_step(
        "inference.json",
        {
            "model_dir": models,
            "output_dir": work / f"samples_{tag}",
            "num_samples": num_samples,
            "batch_size": 50,  # throughput only; seconds per sample are timed apart, at batch 10
            "seed": seed,
            "scheduler": kind,
            "num_inference_steps": steps,
            **EULER.get(kind, {}),
            "preview": False,
        },
    )
    run_demo.bundle_step(
        "evaluate.json",
        {
            "dataset_dir": data / "voxels_nifti",
            "samples_dir": work / f"samples_{tag}",
            "model_dir": models,
            "output_dir": work / f"eval_{tag}",
            "emd_points": 0,
            "num_workers": 2,
            "reference_file": data / "test_clouds.h5",
            "sets": "['samples']",  # the floor (training clouds) is in the demo's own evaluation
        },
    )
    return json.loads((work / f"eval_{tag}" / "metrics.json").read_text())["rows"]


def values(rows):
    """The fidelity figures of the samples' row, as numbers (``None`` where missing)."""
    row = dict(rows["samples"])
    fg = row.get("foreground_fraction")
    if fg:
        row["foreground_fraction"] = dict(fg, gap=abs(fg["mean"] - fg["reference_mean"]))
    return [row.get(key, {}).get(field) for _, key, field, _ in METRICS]


def spread_verdict(rflow, ddim):
    """Per metric: RFlow-10's mean minus DDIM-50's, and whether it lies within twice the larger of the two seeds'
    standard deviations (the run-to-run spread). Better: a higher COV, a 1-NNA or C2ST nearer 50 %, lower elsewhere."""
    cells, matched = [], []
    for m, (name, *_, scale) in enumerate(METRICS):
        a = np.array([v[m] for v in rflow], float) * scale
        b = np.array([v[m] for v in ddim], float) * scale
        spread = max(a.std(ddof=1) if len(a) > 1 else 0.0, b.std(ddof=1) if len(b) > 1 else 0.0)
        diff = a.mean() - b.mean()
        if name.startswith("COV"):
            better = diff > 0
        elif name.startswith(("1-NNA", "C2ST")):  # both: 50 % is a perfect match
            better = abs(a.mean() - 50) < abs(b.mean() - 50)
        else:
            better = diff < 0
        ok = better or abs(diff) <= 2 * spread
        matched.append(ok)
        cells.append(f"{diff:+.3g} (2σ {2 * spread:.3g}) {'✓' if ok else '✗'}")
    return cells, all(matched)


def main():
    parser = common.arg_parser(__doc__, "two epochs, 10 samples, one seed: a smoke check", tmpdir="runs")
    parser.add_argument("--demo_dir", default=None, help="the demo's output_dir (default: the bundle's demo folders)")
    parser.add_argument("--epochs", type=int, default=None, help="stage-2 epochs (default: the demo's)")
    parser.add_argument("--seeds", type=int, default=3, help="sampling seeds of DDIM-50 and RFlow-10 (the spread)")
    args = parser.parse_args()
    load = common.load_average()
    base = Path(args.demo_dir) if args.demo_dir else None
    data, outputs = (base / "data", base / "outputs") if base else (ROOT / "data/demo", ROOT / "outputs/demo")
    epochs = args.epochs or (2 if args.quick else 80)
    num_samples, seeds = (10, 1) if args.quick else (100, args.seeds)
    table, repeated, minutes = [], {}, {}
    with common.work_folder(__file__, args.tmpdir) as work:
        for objective, samplers in SAMPLERS.items():
            models, minutes[objective] = train(objective, data, outputs, work, epochs, seed=0)
            for kind, steps in samplers:
                steps = 20 if args.quick and kind == "DDPM" else steps  # --quick: no 1000-step run
                runs = [
                    values(sample_and_evaluate(models, kind, steps, seed, data, work, num_samples))
                    for seed in (range(seeds) if (kind, steps) in REPEATED else [0])
                ]
                repeated[(kind, steps)] = runs
                table.append((objective, kind, steps, seconds_per_sample(models, kind, steps), runs))
                print(
                    json.dumps({"row": table[-1][:4], "runs": runs}), file=sys.stderr, flush=True
                )  # kept if the rest fails
    lines = common.machine_header(
        "Sampling steps: fidelity against seconds per sample", args.quick, load, (torch, monai, np), torch_info=True
    )
    lines += [
        f"Stage 2 trained for {epochs} epochs per objective on the demo's data and autoencoder (the demo's recipe, "
        "seed 0; minutes: "
        + ", ".join(f"{k} {'the demo’s run' if v is None else f'{v:.1f}'}" for k, v in minutes.items())
        + f"); {num_samples} samples per "
        "row through the demo's fine stage against the demo's test clouds. Rows sampled with several seeds show "
        "mean ± std over the seeds.",
        "",
        "| objective | sampler | steps | s / sample | seeds | " + " | ".join(name for name, *_ in METRICS) + " |",
        "|---|---|---:|---:|---:|" + "---:|" * len(METRICS),
    ]
    for objective, kind, steps, seconds, runs in table:
        cells = []
        for m, (*_, scale) in enumerate(METRICS):
            column = [r[m] for r in runs if r[m] is not None]
            if not column:
                cells.append("–")
            elif len(column) == 1:
                cells.append(f"{column[0] * scale:.3g}")
            else:
                cells.append(f"{np.mean(column) * scale:.3g} ± {np.std(column, ddof=1) * scale:.2g}")
        lines.append(f"| {objective} | {kind} | {steps} | {seconds:.3f} | {len(runs)} | {' | '.join(cells)} |")
    cells, matched = spread_verdict(repeated[("RFlow", 10)], repeated[("DDIM", 50)])
    speed = {(k, s): sec for _, k, s, sec, _ in table}
    lines += [
        "",
        "RFlow-10 against DDIM-50 (mean difference; ✓ when better, or within twice the larger seed spread):",
        "",
        "| " + " | ".join(name for name, *_ in METRICS) + " |",
        "|" + "---:|" * len(METRICS),
        "| " + " | ".join(cells) + " |",
        "",
        f"Target (RFlow at ≤ 10 steps matches DDIM-50 on every metric, ≥ 5× faster): quality "
        f"{'met' if matched else 'missed'}; RFlow-10 is {speed[('DDIM', 50)] / speed[('RFlow', 10)]:.1f}× faster "
        "per sample than DDIM-50.",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
