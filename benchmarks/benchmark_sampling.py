"""Benchmark sampling: DDPM (1000 steps) vs DDIM (50 steps) per sample, and the grid → point-cloud export.

Run from the bundle root::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/benchmark_sampling.py [--quick]

Cases: (1) seconds per generated sample with ``scripts.networks.schedulers.make_scheduler`` + ``sample_grids`` (noise →
denoising loop → decode), DDPM with all 1000 training timesteps against DDIM with 50, at the demo's grid size with
the demo's networks (``scripts/run_demo.py``) and at 64³ with the configs' default networks; (2) grid → 100 000
points with ``scripts.data.voxelize.grid_to_points`` ('probabilistic', and 'center'/'random' for comparison) against
what a prototype would write: ``np.random.choice`` over every voxel, then each point's position in a Python loop.

The networks are randomly initialised: the time of a denoising step does not depend on the weights' values, only
on the architecture and the grid size. ``--quick`` runs every case with the tests' tiny networks, few steps and
small grids: a smoke check of the script, not a measurement.
"""

import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root: benchmarks.common and scripts

from benchmarks import common  # noqa: E402
from benchmarks.common import ROOT, SEED, TINY_AUTOENCODER, TINY_UNET  # noqa: E402

# isort: split
import monai  # noqa: E402
import numpy as np  # noqa: E402
import scipy  # noqa: E402
import torch  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402
from scripts import run_demo  # noqa: E402
from scripts.data.geometry import GridGeometry  # noqa: E402
from scripts.data.voxelize import EXPORT_THRESHOLD, grid_to_points  # noqa: E402
from scripts.networks.build import build_autoencoder, build_unet  # noqa: E402
from scripts.networks.checks import autoencoder_grid, latent_shape  # noqa: E402
from scripts.networks.precision import autocast_dtype, cpu_has_bf16  # noqa: E402
from scripts.networks.schedulers import sample_grids  # noqa: E402
from scripts.runtime.validators import literal  # noqa: E402

INFERENCE = common.parse_config(ROOT / "configs" / "inference.json", {}, "batch_size")
BATCH = INFERENCE["batch_size"]  # grids denoised at once
BOX_NM = ((0.0, 0.0, -300.0), (5000.0, 5000.0, 300.0))  # the demo data's box (scripts/simulate_smlm.py)
THRESHOLD = EXPORT_THRESHOLD  # the voxel exports' default (inference.json's threshold: null)

# Each size: its networks (the label: the demo's, the configs' defaults or the tests' tiny ones), the grid and the
# runs. A DDPM run with ``fit`` is timed at those two (shorter) step counts and extrapolated linearly to ``steps``.
FULL = {
    "sizes": [
        {"label": "demo", "grid": (32, 32, 16), "runs": [("DDPM", 1000, None), ("DDIM", 50, None)]},
        {"label": "default", "grid": (64, 64, 64), "runs": [("DDPM", 1000, (10, 100)), ("DDIM", 50, None)]},
    ],
    "fp32_ddim": True,  # one more DDIM row per size in fp32 (inference.json's amp=false)
    "repeat": 3,
    "export_shapes": [(64, 64, 64), (256, 256, 64)],
    "num_points": 100_000,
    "export_repeat": 7,
}
QUICK = {
    "sizes": [
        {"label": "demo", "grid": (32, 32, 16), "runs": [("DDPM", 20, None), ("DDIM", 5, None)]},
        {"label": "tiny", "grid": (16, 16, 16), "runs": [("DDPM", 50, (2, 5)), ("DDIM", 5, None)]},
    ],
    "fp32_ddim": True,
    "repeat": 1,
    "export_shapes": [(32, 32, 16), (64, 64, 32)],
    "num_points": 10_000,
    "export_repeat": 1,
}


# ----------------------------------------------------------------------------------------------------------------
# Networks, as the configs (and the demo's overrides of them) build them
# ----------------------------------------------------------------------------------------------------------------


def network_args(grid, networks):
    """``(autoencoder_args, unet_args, scheduler_settings, latent_shape)`` parsed from the two training configs with
    the demo's overrides (``networks='demo'``), the tests' tiny networks ('tiny') or none ('default')."""
    overrides = {"demo": (run_demo.AUTOENCODER, run_demo.DIFFUSION), "tiny": (TINY_AUTOENCODER, TINY_UNET)}
    ae_over, unet_over = overrides.get(networks, ({}, {}))
    ae_over = {k: literal(v) for k, v in ae_over.items() if k != "voxel_size"}
    config = ROOT / "configs" / "train_autoencoder.json"
    ae_args = dict(common.parse_config(config, ae_over, "autoencoder_args")["autoencoder_args"])
    autoencoder_grid(ae_args, grid)
    latent = latent_shape(ae_args, grid)
    unet_args, settings, _ = common.unet_values({k: literal(v) for k, v in unet_over.items()}, latent)
    return ae_args, unet_args, settings, latent


# ----------------------------------------------------------------------------------------------------------------
# Case 1: sampling
# ----------------------------------------------------------------------------------------------------------------


def time_sampling(nets, kind, steps, device, amp_dtype):
    """Seconds for one ``sample_grids`` call of ``BATCH`` grids with a ``kind`` scheduler of ``steps`` steps."""
    ae, unet, settings, latent, grid_shape = nets
    scheduler = common.untrained_sampler(settings, kind, steps)
    torch.manual_seed(SEED)  # DDPM draws its per-step noise from the global generator (as Sampler.run seeds it)
    common.sync(device)
    start = time.perf_counter()
    grids = sample_grids(
        ae, unet, scheduler, 1.0, latent, BATCH, device, torch.Generator().manual_seed(SEED), amp_dtype
    )
    seconds = time.perf_counter() - start
    if len(scheduler.timesteps) != steps or tuple(grids.shape[2:]) != grid_shape:
        raise RuntimeError(
            f"{kind}: expected {steps} steps and {grid_shape} grids, got {len(scheduler.timesteps)} steps and "
            f"{tuple(grids.shape)}"
        )
    return seconds


def case_sampling(cfg, device, amp_dtype):
    """Per size: the networks, and for each run (kind, steps, precision) every repeat's seconds per call."""
    sizes = []
    for size in cfg["sizes"]:
        ae_args, unet_args, settings, latent = network_args(size["grid"], size["label"])
        torch.manual_seed(SEED)
        ae = build_autoencoder(ae_args).to(device).eval().requires_grad_(False)
        unet = build_unet(unet_args).to(device).eval().requires_grad_(False)
        nets = (ae, unet, settings, latent, tuple(size["grid"]))
        runs = []
        for kind, steps, fit in size["runs"]:
            for measured in fit or (steps,):
                runs.append({"kind": kind, "steps": measured, "dtype": amp_dtype})
        if cfg["fp32_ddim"] and amp_dtype is not None:
            runs += [{"kind": kind, "steps": steps, "dtype": None} for kind, steps, _ in size["runs"] if kind == "DDIM"]
        time_sampling(nets, "DDIM", 2, device, amp_dtype)  # warm-up: allocator, kernels, oneDNN primitives
        for run in runs:
            run["times"] = []
        for i in range(cfg["repeat"]):
            for run in runs:  # interleaved: every run once per repeat
                what = f"{size['label']} {run['kind']} {run['steps']} ({i + 1}/{cfg['repeat']})"
                print(f"case 1: {what} ...", file=sys.stderr)
                run["times"].append(time_sampling(nets, run["kind"], run["steps"], device, run["dtype"]))
        sizes.append(dict(size, ae_args=ae_args, unet_args=unet_args, latent=latent, settings=settings, measured=runs))
        del ae, unet, nets
        gc.collect()
    return sizes


def sampling_rows(size, amp_dtype):
    """``[(kind, steps, precision, seconds per call, how)]`` with DDPM extrapolated where the size asks for it."""
    best = {(r["kind"], r["steps"], r["dtype"]): min(r["times"]) for r in size["measured"]}
    rows = []
    for kind, steps, fit in size["runs"]:
        if fit is None:
            rows.append((kind, steps, amp_dtype, best[kind, steps, amp_dtype], "timed"))
            continue
        short, long = fit
        per_step = (best[kind, long, amp_dtype] - best[kind, short, amp_dtype]) / (long - short)
        fixed = best[kind, long, amp_dtype] - long * per_step
        how = f"extrapolated from {short} and {long} steps: {fixed:.2f} s + {steps} × {per_step:.4f} s per call"
        rows.append((kind, steps, amp_dtype, fixed + steps * per_step, how))
    if amp_dtype is not None:
        rows += [
            (r["kind"], r["steps"], None, min(r["times"]), "timed") for r in size["measured"] if r["dtype"] is None
        ]
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Case 2: grid → points
# ----------------------------------------------------------------------------------------------------------------


def smooth_grid(shape, rng):
    """A smooth random grid in [0, 1]: Gaussian noise blurred (σ 2 voxels), negative half clipped, / its maximum."""
    grid = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=2.0)
    np.clip(grid, 0.0, None, out=grid)
    grid /= grid.max()
    return grid


def reference_probabilistic(grid, geometry, num_points, threshold):
    """A prototype's export: ``np.random.choice`` over every voxel with p = the thresholded grid / its sum, then each
    point's position (``np.unravel_index`` + a uniform offset in the voxel, to nm) computed in a Python loop."""
    values = np.where(grid > threshold, grid, 0.0).astype(np.float64).ravel()
    chosen = np.random.choice(values.size, size=num_points, p=values / values.sum())
    lo, spacing = geometry.lo, geometry.spacing_nm
    points = np.empty((num_points, 3))
    for k, flat in enumerate(chosen):
        points[k] = lo + (np.array(np.unravel_index(flat, grid.shape)) + np.random.random(3)) * spacing
    return points


def reference_per_voxel(grid, geometry, threshold, jitter):
    """A prototype's 'center'/'random' export: ``np.argwhere`` above the threshold, + 0.5 or a uniform offset."""
    idx = np.argwhere(grid > threshold).astype(np.float64)
    return geometry.to_nm(idx + (np.random.random(idx.shape) if jitter else 0.5))


def case_export(cfg):
    results = []
    for shape in cfg["export_shapes"]:
        grid = smooth_grid(shape, np.random.default_rng(SEED))
        geometry = GridGeometry(BOX_NM[0], BOX_NM[1], shape)
        np.random.seed(SEED)
        n = cfg["num_points"]
        pipelines = {
            "reference probabilistic": lambda: reference_probabilistic(grid, geometry, n, THRESHOLD),
            "ours probabilistic": lambda: grid_to_points(grid, geometry, "probabilistic", THRESHOLD, n, rng=SEED),
            "reference center": lambda: reference_per_voxel(grid, geometry, THRESHOLD, False),
            "ours center": lambda: grid_to_points(grid, geometry, "center", THRESHOLD, rng=SEED),
            "reference random": lambda: reference_per_voxel(grid, geometry, THRESHOLD, True),
            "ours random": lambda: grid_to_points(grid, geometry, "random", THRESHOLD, rng=SEED),
        }
        times, outputs = {k: [] for k in pipelines}, {}
        for i in range(cfg["export_repeat"]):
            print(f"case 2: {shape} ({i + 1}/{cfg['export_repeat']}) ...", file=sys.stderr)
            for name, func in pipelines.items():
                seconds, outputs[name] = common.timed(func)
                times[name].append(seconds)
        for name, points in outputs.items():
            if not np.all(geometry.inside(points)):
                raise RuntimeError(f"{name} at {shape}: points outside the box")
        checks = {name: len(points) for name, points in outputs.items()}
        # Same distribution: the mean position (in voxels) of ours vs the reference's, per axis, in standard errors
        ours_v, ref_v = (geometry.to_voxel(outputs[f"{k} probabilistic"]) for k in ("ours", "reference"))
        mean_diff = np.abs(ours_v.mean(0) - ref_v.mean(0))
        z_score = mean_diff / np.sqrt(ours_v.var(0) / len(ours_v) + ref_v.var(0) / len(ref_v))
        for mode in ("center", "random"):
            if checks[f"ours {mode}"] != checks[f"reference {mode}"]:
                raise RuntimeError(f"{mode} at {shape}: {checks[f'ours {mode}']} vs {checks[f'reference {mode}']}")
        above = float((grid > THRESHOLD).mean())
        results.append(dict(shape=shape, times=times, counts=checks, above=above, mean_diff=mean_diff, z_score=z_score))
    return results


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def verdict(z_score):
    return "consistent with one distribution" if np.all(z_score < 4) else "DIFFERENT DISTRIBUTIONS?"


def print_report(cfg, quick, load, device, amp_dtype, sampling, export):
    note = (
        f"sampling device {device}; native CPU bf16: {cpu_has_bf16()}, so inference's `autocast_dtype(device, "
        f"amp=True)` = {amp_dtype}"
    )
    modules = (torch, monai, np, scipy)
    title = "Sampling and export benchmark"
    lines = common.machine_header(title, quick, load, modules, note, torch_info=True, method="Sampling")
    lines += ["| Case | Pipeline | Precision | Output | Seconds | Ratio | How |", "|---|---|---|---|---:|---|---|"]
    for size in sampling:
        rows = sampling_rows(size, amp_dtype)
        ddpm = next(r for r in rows if r[0] == "DDPM" and r[2] == amp_dtype)
        label = f"1: {size['label']} grid {common.fmt_shape(size['grid'])} (latent {common.fmt_shape(size['latent'])})"
        for kind, steps, dtype, seconds, how in rows:
            per = seconds / BATCH
            if kind == "DDPM" and dtype == amp_dtype:
                ratio = "1.00× (baseline)"
            else:
                ratio = f"**{ddpm[3] / seconds:.1f}×** faster than DDPM {ddpm[1]}"
            precision = common.fmt_dtype(dtype, scaler=False)
            lines.append(f"| {label} | {kind} {steps} steps | {precision} | per sample | {per:.3f} | {ratio} | {how} |")
    for res in export:
        label = f"2: grid {common.fmt_shape(res['shape'])} → points"
        t = {k: min(v) for k, v in res["times"].items()}
        for mode in ("probabilistic", "center", "random"):
            n_ref, n_ours = res["counts"][f"reference {mode}"], res["counts"][f"ours {mode}"]
            ref, ours = t[f"reference {mode}"], t[f"ours {mode}"]
            lines += [
                f"| {label} | reference, {mode} | – | {n_ref:,} points | {ref:.4f} | 1.00× (baseline) | "
                f"{'np.random.choice + Python loop' if mode == 'probabilistic' else 'np.argwhere'} |",
                f"| {label} | `grid_to_points` {mode} | – | {n_ours:,} points | {ours:.4f} | "
                f"**{ref / ours:.2f}×** reference/ours | |",
            ]
    lines.append("")
    for size in sampling:
        calls = "; ".join(
            f"{r['kind']} {r['steps']} {common.fmt_dtype(r['dtype'], scaler=False)} {common.fmt_runs(r['times'], 2)}"
            for r in size["measured"]
        )
        lines.append(
            f"- Case 1, {size['label']} {common.fmt_shape(size['grid'])}: "
            f"{common.describe_autoencoder(size['ae_args'])}; {common.describe_unet(size['unet_args'])}; scheduler "
            f"{size['settings']}. All calls (s per call of {BATCH} samples): {calls}."
        )
    for res in export:
        lines.append(
            f"- Case 2, {common.fmt_shape(res['shape'])}: {res['above']:.1%} of the voxels above the threshold; |mean "
            f"position ours − reference| (probabilistic, voxels, x/y/z) = {common.fmt_runs(res['mean_diff'], 3)}, i.e. "
            f"{common.fmt_runs(res['z_score'], 1)} standard errors ({verdict(res['z_score'])}); all runs (s): "
            + "; ".join(f"{k} {common.fmt_runs(v, 4)}" for k, v in res["times"].items())
            + "."
        )
    print("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = common.arg_parser(__doc__, "tiny networks, few steps: a smoke check in seconds")
    parser.add_argument("--repeat", type=int, default=None, help="calls per sampling row (default 3, quick 1)")
    args = parser.parse_args(argv)
    cfg = common.pick_config(args, QUICK, FULL)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as configs/inference.json
    amp_dtype = autocast_dtype(device, True)
    load = common.load_average()
    sampling = case_sampling(cfg, device, amp_dtype)
    export = case_export(cfg)
    print_report(cfg, args.quick, load, device, amp_dtype, sampling, export)


if __name__ == "__main__":
    main()
