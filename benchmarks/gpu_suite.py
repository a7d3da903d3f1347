"""Every benchmark's GPU section in one command, within about 8 minutes on one GPU, as one Markdown table.

Run from the bundle root on the GPU machine::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/gpu_suite.py [--output gpu_suite.md] [--quick]

Sections, at the configs' defaults (64³ grids, the default networks, AMP: fp16 autocast with a grad scaler on
CUDA, as the trainers run):

1. stage 1: one AutoencoderKL + PatchDiscriminator training step (L1 + KL + adversarial, both optimizers);
2. stage 2: one diffusion UNet training step on the autoencoder's latents (rectified flow, the default objective);
3. the fine stage: one training step on ``points_per_volume`` points per volume;
4. sampling: seconds per sample of noise → denoising → decode, RFlow-10, DDIM-50 and DDPM-1000;
5. a large-field decode: the autoencoder's decoder on the latent of a 256 × 256 × 32 grid, whole-volume;
6. a large field sampled: the shipped networks (``models/``) denoising the latent of a 1024 × 1024 × 48 grid in
   tiles (RFlow-10, overlap 0.25) and decoding it by sliding window (``scripts/sampling/large_fields.py``), as
   ``--field_size_nm`` samples a 20 µm field at 20 nm voxels (the fine stage's points are not included);
7. conversion: simulated clouds to 64³ NIfTI grids with ``convert`` (the host's CPUs).

Each step is timed after a warm-up (median of the timed runs) with the peak CUDA memory allocated. The networks are
randomly initialised: step times depend on the architecture and the sizes, not on the weights. Without CUDA it runs
on the CPU; ``--quick`` uses the tests' tiny networks, 16³ grids and few steps (a smoke check, tested on CPU).
"""

import contextlib
import gc
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root: benchmarks.common and scripts

from benchmarks import common  # noqa: E402
from benchmarks.common import BATCH, ROOT, SEED, TINY_AUTOENCODER, TINY_UNET  # noqa: E402

# isort: split
import monai  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scripts.networks.precision import autocast_context  # noqa: E402

FULL = {"grid": 64, "timed": 5, "steps": {"RFlow": 10, "DDIM": 50, "DDPM": 1000}, "field": (256, 256, 32)}
FULL.update(large_field=(1024, 1024, 48), field_steps=10)
FULL.update(clouds=32, points=10_000, sample_batch=2, autoencoder={}, unet={}, refiner={})
QUICK = {"grid": 16, "timed": 2, "steps": {"RFlow": 3, "DDIM": 3, "DDPM": 5}, "field": (32, 32, 16)}
QUICK.update(clouds=4, points=1000, sample_batch=1, autoencoder=TINY_AUTOENCODER, unet=TINY_UNET)
QUICK.update(large_field=(64, 64, 16), field_steps=2)
QUICK.update(refiner={"refiner_channels": [8, 8, 8], "refiner_hidden": 16, "points_per_volume": 128})


def _peak_reset(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def timed_steps(step, device, n):
    """``(median seconds, peak bytes)`` of ``step()`` over ``n`` runs after one warm-up."""
    _peak_reset(device)
    step()
    times = []
    for _ in range(n):
        common.sync(device)
        start = time.perf_counter()
        step()
        common.sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), _peak(device)


def autoencoder_settings(cfg):
    args = common.parse_config(
        ROOT / "configs" / "train_autoencoder.json", cfg["autoencoder"], "autoencoder_args", "discriminator_args"
    )
    return dict(args["autoencoder_args"]), dict(args["discriminator_args"])


def diffusion_settings(cfg):
    """The default autoencoder's settings, its latent shape for ``cfg['grid']``, and the UNet's settings."""
    from scripts.networks.checks import latent_shape

    ae_args, _ = autoencoder_settings(cfg)
    latent = latent_shape(ae_args, cfg["grid"])
    return (ae_args, latent, *common.unet_values(cfg["unet"], latent))


def stage1(cfg, device, amp):
    ae_args, d_args = autoencoder_settings(cfg)
    step = common.stage1_step(ae_args, d_args, {}, device, amp)  # the bundle's VaeGanTrainer._iteration
    images = torch.rand(BATCH, 1, *(cfg["grid"],) * 3, device=device)
    seconds, peak = timed_steps(lambda: step(images), device, cfg["timed"])
    return f"AutoencoderKL {ae_args['channels']} + discriminator, batch {BATCH}, {cfg['grid']}³", seconds, peak


def stage2(cfg, device, amp):
    _, latent, unet_args, settings, lr = diffusion_settings(cfg)
    step = common.stage2_step(unet_args, settings, lr, device, amp)  # the bundle's LatentDiffusionTrainer._iteration
    latents = torch.randn(BATCH, *latent, device=device)
    seconds, peak = timed_steps(lambda: step(latents), device, cfg["timed"])
    return f"UNet {unet_args['channels']} on {list(latent)} latents, batch {BATCH}", seconds, peak


def refiner_step(cfg, device, amp):
    from scripts.networks.fine_stage import offset_scale

    keys = ("refiner_channels", "refiner_hidden", "refiner_layers", "points_per_volume")
    values = common.parse_config(ROOT / "configs" / "train_refiner.json", cfg["refiner"], *keys)
    args = {"channels": values["refiner_channels"], "hidden": values["refiner_hidden"]}
    args.update(num_layers=values["refiner_layers"], offset_scale=offset_scale([1.0, 1.0, 1.0]))
    points_per_volume = values["points_per_volume"]
    # the bundle's RefinerTrainer._iteration
    train = common.refiner_step(args, [1.0, 1.0, 1.0], device, amp)
    shape = (cfg["grid"],) * 3
    generator = torch.Generator().manual_seed(SEED)
    points = torch.rand(BATCH, points_per_volume, 3, generator=generator) * torch.tensor(shape) - 0.5
    batch = {"image": torch.rand(BATCH, 1, *shape, generator=generator), "points": points}
    seconds, peak = timed_steps(lambda: train(batch), device, cfg["timed"])
    return f"fine stage {args['channels']}, {points_per_volume} points × {BATCH} volumes", seconds, peak


def sampling(cfg, device, amp):
    from scripts.networks.build import build_autoencoder, build_unet
    from scripts.networks.schedulers import sample_grids

    ae_args, latent, unet_args, settings, _ = diffusion_settings(cfg)
    autoencoder, unet = build_autoencoder(ae_args).to(device).eval(), build_unet(unet_args).to(device).eval()
    rows, n = [], cfg["sample_batch"]
    for kind, steps in cfg["steps"].items():
        scheduler = common.untrained_sampler(settings, kind, steps)
        seconds, peak = timed_steps(
            lambda s=scheduler: sample_grids(autoencoder, unet, s, 1.0, latent, n, device, None, amp), device, 1
        )
        rows.append((f"{kind}-{steps}, {cfg['grid']}³ grid, batch {n}, per sample", seconds / n, peak))
    return rows


def large_decode(cfg, device, amp):
    from scripts.networks.build import build_autoencoder
    from scripts.networks.checks import latent_shape

    ae_args, _ = autoencoder_settings(cfg)
    autoencoder = build_autoencoder(ae_args).to(device).eval()
    latent = torch.randn(1, *latent_shape(ae_args, cfg["field"]), device=device)

    def step():
        with torch.no_grad(), autocast_context(device, amp):
            autoencoder.decode(latent)

    seconds, peak = timed_steps(step, device, 1)
    grid_bytes = 4 * int(np.prod(cfg["field"]))
    label = f"whole-volume decode of a {' × '.join(map(str, cfg['field']))} grid (output {grid_bytes / 2**20:.0f} MiB)"
    return label, seconds, peak


def large_field(cfg, device, amp):
    from scripts.networks import trained as weights
    from scripts.networks.schedulers import make_scheduler
    from scripts.sampling.large_fields import decode_tiled, decoding_window, denoise_tiled

    models = ROOT / "models"
    autoencoder_ckpt = weights.load_autoencoder_checkpoint(models / "model_autoencoder.pt")
    ckpt = weights.load_diffusion_checkpoint(models / "model.pt", autoencoder_ckpt, models / "model_autoencoder.pt")
    autoencoder = weights.frozen_autoencoder(autoencoder_ckpt, "", device)
    unet = weights.trained_unet(ckpt, "", device)
    tile = tuple(ckpt["latent_shape"][1:])
    noise = torch.randn((1, 3, *(s // 2 for s in cfg["large_field"])), device=device)

    def step():
        scheduler = make_scheduler(ckpt["scheduler"], None, cfg["field_steps"])
        latent = denoise_tiled(unet, scheduler, noise, tile, 0.25, 64, device, amp)
        decode_tiled(autoencoder, latent, ckpt["scale_factor"], decoding_window(tile), 0.25, 16, device, amp)

    with contextlib.redirect_stdout(io.StringIO()):  # the denoising's progress lines
        seconds, peak = timed_steps(step, device, 1)
    grid = " × ".join(map(str, cfg["large_field"]))
    return f"RFlow-{cfg['field_steps']} in tiles + sliding-window decode, {grid} grid (shipped networks)", seconds, peak


def conversion(cfg, work):
    from scripts.convert_h5_to_nifti import convert
    from scripts.data.pointclouds import write_point_clouds_h5
    from scripts.simulate_smlm import simulate_microtubules

    h5 = work / "clouds.h5"
    write_point_clouds_h5(h5, simulate_microtubules(cfg["clouds"], seed=SEED, mean_points=cfg["points"]))
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        convert(h5, work / "voxels", voxel_size=cfg["grid"], num_workers=min(8, max(1, _cpus())))
    label = f"{cfg['clouds']} clouds × {cfg['points']} points → {cfg['grid']}³ NIfTI ({min(8, _cpus())} workers)"
    return label, time.perf_counter() - start, None


def _cpus():
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def report(rows, device, amp, quick, seconds):
    if device.type == "cuda":
        card = (
            f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
        )
    else:
        card = f"no GPU: CPU ({common.cpu_name()}, {_cpus()} cores)"
    lines = [
        "# GPU suite" + (" (--quick: tiny networks, a smoke check, not a measurement)" if quick else ""),
        "",
        f"Device: {card}; torch {torch.__version__}, MONAI {monai.__version__}; AMP: {amp}. Suite time {seconds:.0f} s.",
        "",
        "| section | case | seconds | peak memory (MiB) |",
        "|---|---|---:|---:|",
    ]
    for section, label, secs, peak in rows:
        lines.append(f"| {section} | {label} | {secs:.4g} | {'–' if peak is None else f'{peak / 2**20:.0f}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = common.arg_parser(__doc__, "tiny networks and 16³ grids: a smoke check", tmpdir="conversion")
    parser.add_argument("--output", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from scripts.networks.precision import autocast_dtype

    amp = autocast_dtype(device, True)
    torch.manual_seed(SEED)
    start, rows = time.perf_counter(), []
    for section, case in (("stage 1 step", stage1), ("stage 2 step", stage2), ("fine-stage step", refiner_step)):
        print(f"{section} ...", file=sys.stderr)
        rows.append((section, *case(cfg, device, amp)))
    print("sampling ...", file=sys.stderr)
    rows += [("sampling", *row) for row in sampling(cfg, device, amp)]
    print("large-field decode ...", file=sys.stderr)
    try:
        rows.append(("large-field decode", *large_decode(cfg, device, amp)))
    except torch.OutOfMemoryError as e:
        rows.append(("large-field decode", f"out of memory: {str(e).splitlines()[0][:80]}", float("nan"), None))
    print("large field ...", file=sys.stderr)
    try:
        rows.append(("large field", *large_field(cfg, device, amp)))
    except torch.OutOfMemoryError as e:
        rows.append(("large field", f"out of memory: {str(e).splitlines()[0][:80]}", float("nan"), None))
    print("conversion ...", file=sys.stderr)
    with common.work_folder(__file__, args.tmpdir) as work:
        rows.append(("conversion", *conversion(cfg, Path(work))))
    table = report(rows, device, amp, args.quick, time.perf_counter() - start)
    print(table)
    if args.output:
        Path(args.output).write_text(table)
    return table


if __name__ == "__main__":
    main()
