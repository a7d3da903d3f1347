"""Benchmark sampling: DDPM (1000 steps) vs DDIM (50 steps) per sample, and the grid → point-cloud export.

Run from the bundle root::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/benchmark_sampling.py [--quick]

Cases: (1) seconds per generated sample with ``scripts.sampling.make_scheduler`` + ``sample_grids`` (noise →
denoising loop → decode), DDPM with all 1000 training timesteps against DDIM with 50, at the demo's grid size with
the demo's networks (``scripts/run_demo.py``) and at 64³ with the configs' default networks; (2) grid → 100 000
points with ``scripts.voxelize.grid_to_points`` ('probabilistic', and 'center'/'random' for comparison) against
what a prototype would write: ``np.random.choice`` over every voxel, then each point's position in a Python loop.

The networks are randomly initialised: the time of a denoising step does not depend on the weights' values, only
on the architecture and the grid size. ``--quick`` runs every case with the tests' tiny networks, few steps and
small grids: a smoke check of the script, not a measurement.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import ast  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import monai  # noqa: E402
import numpy as np  # noqa: E402
import scipy  # noqa: E402
import torch  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402

from scripts import run_demo  # noqa: E402
from scripts.engines import autocast_dtype, cpu_has_bf16  # noqa: E402
from scripts.geometry import GridGeometry  # noqa: E402
from scripts.networks import (  # noqa: E402
    build_autoencoder,
    build_unet,
    check_autoencoder,
    check_diffusion,
    latent_shape,
)
from scripts.sampling import make_scheduler, sample_grids  # noqa: E402
from scripts.voxelize import grid_to_points  # noqa: E402

SEED = 0
BATCH = 2  # configs/inference.json's batch_size: grids denoised at once
BOX_NM = ((0.0, 0.0, -300.0), (5000.0, 5000.0, 300.0))  # the demo data's box (scripts/simulate_smlm.py)
THRESHOLD = 0.1  # configs/inference.json's threshold
TINY_AUTOENCODER = {  # tests/conftest.py
    "num_channels": [8, 16],
    "norm_num_groups": 8,
    "attention_levels": [False, False],
    "with_nonlocal_attn": False,
}
TINY_UNET = {
    "num_channels": [8, 16],
    "attention_levels": [False, True],
    "num_head_channels": [0, 8],
    "norm_num_groups": 8,
}

# Each size: the grid, the config overrides that make its networks, and the runs. A DDPM run with ``fit`` is timed
# at those two (shorter) step counts and extrapolated linearly to ``steps``.
FULL = {
    "sizes": [
        {"label": "demo", "grid": (32, 32, 16), "demo": True, "runs": [("DDPM", 1000, None), ("DDIM", 50, None)]},
        {
            "label": "default",
            "grid": (64, 64, 64),
            "demo": False,
            "runs": [("DDPM", 1000, (10, 100)), ("DDIM", 50, None)],
        },
    ],
    "fp32_ddim": True,  # one more DDIM row per size in fp32 (inference.json's amp=false)
    "repeat": 3,
    "export_shapes": [(64, 64, 64), (256, 256, 64)],
    "num_points": 100_000,
    "export_repeat": 7,
}
QUICK = {
    "sizes": [
        {"label": "demo", "grid": (32, 32, 16), "demo": True, "runs": [("DDPM", 20, None), ("DDIM", 5, None)]},
        {
            "label": "tiny",
            "grid": (16, 16, 16),
            "demo": False,
            "tiny": True,
            "runs": [("DDPM", 50, (2, 5)), ("DDIM", 5, None)],
        },
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


def _literal(value):
    """The demo passes its overrides as command-line strings ("[16,32,32]", "False"); read them as Python values."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def network_args(grid, demo, tiny=False):
    """``(autoencoder_args, unet_args, scheduler_settings, latent_shape)`` parsed from the two training configs with
    the demo's overrides (``demo``), the tests' tiny networks (``tiny``) or none (the defaults)."""
    ae_over = {k: _literal(v) for k, v in run_demo.AUTOENCODER.items()} if demo else {}
    unet_over = {k: _literal(v) for k, v in run_demo.DIFFUSION.items()} if demo else {}
    if tiny:
        ae_over, unet_over = dict(TINY_AUTOENCODER), dict(TINY_UNET)
    ae_over.pop("voxel_size", None)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train_autoencoder.json"))
    parser.update({k: v for k, v in ae_over.items() if k in parser.get()})
    ae_args = dict(parser.get_parsed_content("autoencoder_args"))
    check_autoencoder(ae_args, grid)
    latent = latent_shape(ae_args, grid)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train_diffusion.json"))
    parser.update({k: v for k, v in unet_over.items() if k in parser.get()})
    parser.update({"latent_shape": list(latent)})  # the config reads it from the stage-1 checkpoint
    unet_args = dict(parser.get_parsed_content("unet_args"))
    check_diffusion(unet_args, latent)
    settings = dict(parser.get_parsed_content("scheduler_settings"))
    return ae_args, unet_args, settings, latent


def describe(args, kind):
    a = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in args.items()}
    if kind == "ae":
        return (
            f"AutoencoderKL channels {a['channels']}, latent {a['latent_channels']}, groups {a['norm_num_groups']}, "
            f"attention {a['attention_levels']}, non-local {a['with_decoder_nonlocal_attn']}"
        )
    return (
        f"DiffusionModelUNet channels {a['channels']}, attention {a['attention_levels']}, heads "
        f"{a['num_head_channels']}, groups {a['norm_num_groups']}, res blocks {a['num_res_blocks']}"
    )


# ----------------------------------------------------------------------------------------------------------------
# Case 1: sampling
# ----------------------------------------------------------------------------------------------------------------


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_sampling(nets, kind, steps, device, amp_dtype):
    """Seconds for one ``sample_grids`` call of ``BATCH`` grids with a ``kind`` scheduler of ``steps`` steps."""
    ae, unet, settings, latent, grid_shape = nets
    scheduler = make_scheduler(settings, kind, steps)
    torch.manual_seed(SEED)  # DDPM draws its per-step noise from the global generator (as Sampler.run seeds it)
    sync(device)
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
        ae_args, unet_args, settings, latent = network_args(size["grid"], size["demo"], size.get("tiny", False))
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
                print(
                    f"case 1: {size['label']} {run['kind']} {run['steps']} ({i + 1}/{cfg['repeat']}) ...",
                    file=sys.stderr,
                )
                run["times"].append(time_sampling(nets, run["kind"], run["steps"], device, run["dtype"]))
        sizes.append(
            {
                **size,
                "ae_args": ae_args,
                "unet_args": unet_args,
                "latent": latent,
                "settings": settings,
                "measured": runs,
            }
        )
        del ae, unet, nets
        gc.collect()
    return sizes


def _find(measured, kind, steps, dtype):
    return next(r for r in measured if r["kind"] == kind and r["steps"] == steps and r["dtype"] == dtype)


def sampling_rows(size, amp_dtype):
    """``[(kind, steps, precision, seconds per call, how)]`` with DDPM extrapolated where the size asks for it."""
    rows = []
    for kind, steps, fit in size["runs"]:
        if fit is None:
            rows.append(
                (kind, steps, amp_dtype, min(_find(size["measured"], kind, steps, amp_dtype)["times"]), "timed")
            )
        else:
            short, long = fit
            t_short = min(_find(size["measured"], kind, short, amp_dtype)["times"])
            t_long = min(_find(size["measured"], kind, long, amp_dtype)["times"])
            per_step = (t_long - t_short) / (long - short)
            fixed = t_long - long * per_step
            rows.append(
                (
                    kind,
                    steps,
                    amp_dtype,
                    fixed + steps * per_step,
                    f"extrapolated from {short} and {long} steps: {fixed:.2f} s + {steps} × {per_step:.4f} s per call",
                )
            )
    for r in size["measured"]:
        if r["dtype"] is None and amp_dtype is not None:
            rows.append((r["kind"], r["steps"], None, min(r["times"]), "timed"))
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


def timed(func, *args, **kwargs):
    start = time.perf_counter()
    out = func(*args, **kwargs)
    return time.perf_counter() - start, out


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
                seconds, outputs[name] = timed(func)
                times[name].append(seconds)
        checks = {}
        for name, points in outputs.items():
            inside = bool(np.all(geometry.inside(points)))
            if not inside:
                raise RuntimeError(f"{name} at {shape}: points outside the box")
            checks[name] = len(points)
        # Same distribution: the mean position (in voxels) of ours vs the reference's, per axis, in standard errors
        ours_v, ref_v = (geometry.to_voxel(outputs[f"{k} probabilistic"]) for k in ("ours", "reference"))
        mean_diff = np.abs(ours_v.mean(0) - ref_v.mean(0))
        z_score = mean_diff / np.sqrt(ours_v.var(0) / len(ours_v) + ref_v.var(0) / len(ref_v))
        for mode in ("center", "random"):
            if checks[f"ours {mode}"] != checks[f"reference {mode}"]:
                raise RuntimeError(f"{mode} at {shape}: {checks[f'ours {mode}']} vs {checks[f'reference {mode}']}")
        results.append(
            {
                "shape": shape,
                "times": times,
                "counts": checks,
                "above": float((grid > THRESHOLD).mean()),
                "mean_diff": mean_diff,
                "z_score": z_score,
            }
        )
    return results


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def load_average():
    return ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def cpu_name():
    processor = platform.processor()
    if (not processor or processor == platform.machine()) and Path("/proc/cpuinfo").is_file():
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        processor = match.group(1).strip() if match else processor
    return processor or platform.machine()


def fmt_shape(shape):
    return "×".join(str(v) for v in shape)


def _dtype(dtype):
    return {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast", None: "fp32"}[dtype]


def _runs(values, digits=2):
    return "/".join(f"{v:.{digits}f}" for v in values)


def verdict(z_score):
    return "consistent with one distribution" if np.all(z_score < 4) else "DIFFERENT DISTRIBUTIONS?"


def print_report(cfg, quick, load, load_after, device, amp_dtype, sampling, export):
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (torch.cuda.is_available() is False)"
    lines = [
        f"# Sampling and export benchmark{' (--quick)' if quick else ''}",
        "",
        f"- Machine: {cpu_name()} ({platform.machine()}), os.cpu_count() = {os.cpu_count()}, usable cores = "
        f"{usable}, torch threads = {torch.get_num_threads()}, load average (1/5/15 min) before the run = {load}, "
        f"after = {load_after}; GPU: {gpu}",
        f"- {platform.system()} {platform.release()}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"monai {monai.__version__}, numpy {np.__version__}, scipy {scipy.__version__}",
        f"- OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; sampling device {device}; native CPU bf16: "
        f"{cpu_has_bf16()}, so inference's `autocast_dtype(device, amp=True)` = {amp_dtype}",
        "",
        "| Case | Pipeline | Precision | Output | Seconds | Ratio | How |",
        "|---|---|---|---|---:|---|---|",
    ]
    for size in sampling:
        rows = sampling_rows(size, amp_dtype)
        ddpm = next(r for r in rows if r[0] == "DDPM" and r[2] == amp_dtype)
        label = f"1: {size['label']} grid {fmt_shape(size['grid'])} (latent {fmt_shape(size['latent'])})"
        for kind, steps, dtype, seconds, how in rows:
            per = seconds / BATCH
            if kind == "DDPM" and dtype == amp_dtype:
                ratio = "1.00× (baseline)"
            else:
                ratio = f"**{ddpm[3] / seconds:.1f}×** faster than DDPM {ddpm[1]}"
            lines.append(
                f"| {label} | {kind} {steps} steps | {_dtype(dtype)} | per sample | {per:.3f} | {ratio} | {how} |"
            )
    for res in export:
        label = f"2: grid {fmt_shape(res['shape'])} → points"
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
        lines.append(
            f"- Case 1, {size['label']} {fmt_shape(size['grid'])}: {describe(size['ae_args'], 'ae')}; "
            f"{describe(size['unet_args'], 'unet')}; scheduler {size['settings']}. All calls (s per call of "
            f"{BATCH} samples): "
            + "; ".join(f"{r['kind']} {r['steps']} {_dtype(r['dtype'])} {_runs(r['times'])}" for r in size["measured"])
            + "."
        )
    demo_note = "the demo's overrides of the two training configs (`scripts/run_demo.py` AUTOENCODER/DIFFUSION)"
    if quick:
        demo_note += "; the second size uses the tests' tiny networks (tests/conftest.py)"
    lines += [
        f"- Case 1 measures one `scripts.sampling.sample_grids` call (noise → `LatentDiffusionInferer.sample` with the "
        f"scheduler from `make_scheduler(settings, kind, steps)` → decode → `.float().cpu()`) of {BATCH} samples "
        f"(`configs/inference.json` batch_size); seconds/sample = call / {BATCH}. Networks: "
        f"`scripts.networks.build_autoencoder`/`build_unet` on the `autoencoder_args`/`unet_args` parsed from "
        f"`configs/train_autoencoder.json`/`configs/train_diffusion.json` (defaults, or {demo_note}), randomly "
        f"initialised (seed {SEED}), eval mode, no grads: a step's time depends on the architecture and the latent "
        f"size, not on the weights' values, so trained checkpoints would time the same. Precision: what inference "
        f"uses (`autocast_dtype(device, amp=True)`: {_dtype(amp_dtype)})"
        + (", plus DDIM in fp32 (amp=false) for comparison" if cfg["fp32_ddim"] and amp_dtype is not None else "")
        + f". Best of {cfg['repeat']} call(s) per row, the rows interleaved per repeat after one untimed 2-step DDIM "
        f"warm-up per size; ratio = DDPM time / row time. Not included: NIfTI/CSV writing, the preview.",
        "- Extrapolated rows: the DDPM loop is timed at the two step counts given and fitted as fixed cost (noise, "
        "decode, copies) + steps × per-step cost, then evaluated at the full step count; every DDPM step is the same "
        "UNet call plus an O(latent) scheduler update, so the time is linear in the number of steps.",
        f"- Case 2: one grid per size, smooth random (standard normal noise blurred with σ = 2 voxels, the negative "
        f"half clipped to 0, divided by its maximum), in the demo box {list(BOX_NM[0])}–{list(BOX_NM[1])} nm; "
        f"threshold {THRESHOLD} (inference.json); {cfg['num_points']:,} points for 'probabilistic'; 'center' and "
        f"'random' give one point per voxel above the threshold. Reference (probabilistic): what a prototype would "
        f"write — `np.random.choice(grid.size, n, p=thresholded grid / sum)` over every voxel (legacy global RNG), "
        f"then per point in a Python loop `lo + (np.unravel_index(i, shape) + np.random.random(3)) * spacing`. "
        f"Reference (center/random): `np.argwhere(grid > threshold)` + 0.5 or a uniform offset, to nm. Ours: "
        f"`grid_to_points(grid, geometry, method, threshold, n, rng=seed)` on the float32 grid. Best of "
        f"{cfg['export_repeat']} per row, rows interleaved; all points checked inside the box, center/random point "
        f"counts equal to the reference's.",
    ]
    for res in export:
        lines.append(
            f"- Case 2, {fmt_shape(res['shape'])}: {res['above']:.1%} of the voxels above the threshold; |mean "
            f"position ours − reference| (probabilistic, voxels, x/y/z) = {_runs(res['mean_diff'], 3)}, i.e. "
            f"{_runs(res['z_score'], 1)} standard errors ({verdict(res['z_score'])}); all runs (s): "
            + "; ".join(f"{k} {_runs(v, 4)}" for k, v in res["times"].items())
            + "."
        )
    print("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny networks, few steps: a smoke check in seconds")
    parser.add_argument("--repeat", type=int, default=None, help="calls per sampling row (default 3, quick 1)")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.repeat:
        cfg["repeat"] = max(1, args.repeat)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as configs/inference.json
    amp_dtype = autocast_dtype(device, True)
    load = load_average()
    sampling = case_sampling(cfg, device, amp_dtype)
    export = case_export(cfg)
    print_report(cfg, args.quick, load, load_average(), device, amp_dtype, sampling, export)


if __name__ == "__main__":
    main()
