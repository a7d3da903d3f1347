"""Benchmark stage-2 training (``configs/train_diffusion.json``): the latent cache, and mixed precision.

Run from the bundle root::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/benchmark_diffusion.py [--quick]

Cases: (a) the bundle (``ConfigWorkflow`` on the config, ``LatentDiffusionTrainer``, its handlers and data) with
``latent_cache='memory'`` (every volume encoded once by the frozen autoencoder, the loader serves latents) against
``latent_cache='none'`` (the volumes held in memory, encoded at every step): seconds per training iteration, data
loading included, start-up excluded; plus the one-off time the cache takes to build. A stage-1 checkpoint is made
first (simulated data → ``convert`` → one fast epoch of ``configs/train_autoencoder.json``). (b) the default UNet's
training step (noise, forward, MSE, backward, Adam) on random latents at batch 2 for 32³ and 64³ grids, bf16
autocast vs fp32 on this CPU, and whether the bf16 weight gradients stayed finite; (c) where CUDA is available, the
same on the GPU with fp16 autocast + GradScaler vs fp32, with peak memory.

``--quick`` runs every case with the tests' tiny networks on 16³ grids for 3 iterations: a smoke check of the script,
not a measurement.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")  # the trainer's progress bar would only clutter the table

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ignite  # noqa: E402
import monai  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ignite.engine import Events  # noqa: E402
from monai.bundle import ConfigParser, ConfigWorkflow  # noqa: E402
from monai.data import CacheDataset  # noqa: E402
from monai.utils import set_determinism  # noqa: E402

from scripts.convert_h5_to_nifti import convert  # noqa: E402
from scripts.engines import autocast_context, autocast_dtype, cpu_has_bf16, diffusion_loss  # noqa: E402
from scripts.networks import build_unet, check_diffusion, latent_shape  # noqa: E402
from scripts.pointcloud_io import write_point_clouds_h5  # noqa: E402
from scripts.sampling import make_scheduler  # noqa: E402
from scripts.simulate_smlm import simulate_microtubules  # noqa: E402

AE_CONFIG = ROOT / "configs" / "train_autoencoder.json"
CONFIG = ROOT / "configs" / "train_diffusion.json"
SEED = 0
BATCH = 2

# The seed's default networks are the configs' own; --quick swaps in the tests' tiny ones (tests/conftest.py).
FULL = {
    "voxel": 32,
    "n_clouds": 15,  # 12 train (6 batches of 2: the 12 iterations go twice through the loader), 3 val
    "train_ratio": 0.8,
    "points": 10_000,
    "stage1_batches": 2,
    "iterations": 12,
    "autoencoder": {},
    "unet": {},
    "network_name": "default networks",
    "speed_sizes": (32, 64),
    "speed_iterations": {32: 15, 64: 12},  # timed iterations per precision, after one untimed warm-up each
}
QUICK = {
    "voxel": 16,
    "n_clouds": 8,  # 6 train, 2 val
    "train_ratio": 0.75,
    "points": 3_000,
    "stage1_batches": 2,
    "iterations": 3,
    "network_name": "tiny networks",
    "autoencoder": {
        "num_channels": [8, 16],
        "norm_num_groups": 8,
        "attention_levels": [False, False],
        "with_nonlocal_attn": False,
        "discriminator_channels": 8,
        "discriminator_num_layers": 2,
    },
    "unet": {
        "num_channels": [8, 16],
        "attention_levels": [False, True],
        "num_head_channels": [0, 8],
        "norm_num_groups": 8,
    },
    "speed_sizes": (16,),
    "speed_iterations": {16: 3},
}


# ----------------------------------------------------------------------------------------------------------------
# Data, stage 1, configuration
# ----------------------------------------------------------------------------------------------------------------


def make_dataset(work, cfg):
    """Simulated microtubule clouds converted to ``voxel``³ NIfTI grids; returns the dataset folder."""
    h5 = Path(work) / "clouds.h5"
    clouds = simulate_microtubules(cfg["n_clouds"], seed=SEED, mean_points=cfg["points"])
    write_point_clouds_h5(h5, clouds)
    out = Path(work) / "voxels"
    with contextlib.redirect_stdout(io.StringIO()):
        convert(h5, out, voxel_size=cfg["voxel"], sigma=1.0, train_ratio=cfg["train_ratio"], seed=SEED)
    return out


def monai_logs_to_stderr():
    """MONAI's own loggers (e.g. the workflow's "Setting logging properties ...") write to stdout: move them."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("monai"):
            for handler in logging.getLogger(name).handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                    handler.setStream(sys.stderr)


def run_config(config, overrides):
    """``ConfigWorkflow(config, 'train', **overrides)`` → ``initialize()`` → ``run()`` → ``finalize()``."""
    monai_logs_to_stderr()
    with contextlib.redirect_stdout(sys.stderr):  # configs/logging.conf logs to stdout: keep the table clean
        workflow = ConfigWorkflow(config_file=str(config), workflow_type="train", **overrides)
        workflow.initialize()
        try:
            workflow.run()
        finally:
            workflow.finalize()
    return workflow


def train_stage1(cfg, dataset_dir, work):
    """One fast epoch of ``configs/train_autoencoder.json`` (its validation included, so best_model.pt is saved)."""
    out = Path(work) / "stage1"
    overrides = {
        "dataset_dir": str(dataset_dir),
        "ckpt_dir": str(out / "outputs" / "autoencoder"),
        "log_dir": str(out / "logs" / "autoencoder"),
        "voxel_size": cfg["voxel"],
        "batch_size": BATCH,
        "seed": SEED,
        "n_epochs": 1,
        "fast_dev_run": True,
        "fast_dev_run_batches": cfg["stage1_batches"],
        "num_workers": 0,
        **cfg["autoencoder"],
    }
    start = time.perf_counter()
    workflow = run_config(AE_CONFIG, overrides)
    seconds = time.perf_counter() - start
    args = dict(workflow.parser.get_parsed_content("autoencoder_args"))
    del workflow
    gc.collect()
    path = out / "outputs" / "autoencoder" / "best_model.pt"
    if not path.is_file():
        raise RuntimeError(f"stage 1 wrote no {path}")
    return path, args, seconds


def stage2_overrides(cfg, dataset_dir, autoencoder_path, out_dir, mode):
    """What the benchmark changes in the config: the data, the checkpoint, the outputs, the cache mode, one short
    epoch, no validation and no monitoring samples."""
    return {
        "dataset_dir": str(dataset_dir),
        "autoencoder_path": str(autoencoder_path),
        "ckpt_dir": str(Path(out_dir) / "outputs" / "diffusion"),
        "log_dir": str(Path(out_dir) / "logs" / "diffusion"),
        "latent_cache": mode,
        "batch_size": BATCH,
        "seed": SEED,
        "n_epochs": 1,
        "fast_dev_run": True,
        "fast_dev_run_batches": cfg["iterations"],
        "val_interval": 2,  # validation would run after epoch 2 only: never in a 1-epoch run
        "generate_samples_interval": 1000,  # DDIM monitoring samples: never in a 1-epoch run
        **cfg["unet"],
    }


def unet_values(unet_over, latent):
    """``(unet_args, scheduler_settings, learning_rate)`` parsed from the stage-2 config for a ``latent`` shape."""
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.update(dict(unet_over))
    parser.update({"latent_shape": list(latent)})  # the config reads it from the stage-1 checkpoint
    unet_args = dict(parser.get_parsed_content("unet_args"))
    check_diffusion(unet_args, latent)
    return unet_args, dict(parser.get_parsed_content("scheduler_settings")), parser.get_parsed_content("learning_rate")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------
# Case (a): latent cache 'memory' vs 'none', through the bundle
# ----------------------------------------------------------------------------------------------------------------


def timed_parse(parser, key):
    start = time.perf_counter()
    value = parser.get_parsed_content(key)
    return time.perf_counter() - start, value


def bundle_run(cfg, dataset_dir, autoencoder_path, out_dir, mode):
    """One epoch of ``cfg['iterations']`` iterations through the config with ``latent_cache=mode``.

    Returns seconds per iteration over iterations 2..N (each from fetching its batch, ignite's GET_BATCH_STARTED,
    to the end of its ITERATION_COMPLETED handlers) and the one-off set-up times of the datasets and scale factor.
    """
    shutil.rmtree(out_dir, ignore_errors=True)
    monai_logs_to_stderr()
    with contextlib.redirect_stdout(sys.stderr):
        workflow = ConfigWorkflow(
            config_file=str(CONFIG),
            workflow_type="train",
            **stage2_overrides(cfg, dataset_dir, autoencoder_path, out_dir, mode),
        )
        workflow.initialize()
    parser = workflow.parser
    # Everything the datasets depend on first (checkpoint, frozen autoencoder, file lists), so that the timed parse
    # of each dataset is its own work: loading + resizing the volumes, and encoding them when the cache is on.
    for key in ("autoencoder", "autoencoder_weights_sha256", "preprocessing", "train#datalist", "validate#datalist"):
        parser.get_parsed_content(key)
    setup = {}
    setup["train"], dataset = timed_parse(parser, "train#dataset")
    setup["val"], _ = timed_parse(parser, "validate#dataset")
    setup["scale_factor"], scale_factor = timed_parse(parser, "scale_factor_value")
    if (mode == "none") != isinstance(dataset, CacheDataset):
        raise RuntimeError(f"latent_cache={mode!r} built a {type(dataset).__name__}")
    trainer = parser.get_parsed_content("train#trainer")
    device = trainer.state.device
    marks, iterations, keys = {}, [], []

    def first_batch(engine):
        if engine.state.iteration == 0:
            keys.extend(sorted(engine.state.batch))

    def start(engine):
        if engine.state.iteration == 1:
            sync(device)
            marks["start"] = time.perf_counter()

    def end(engine):
        sync(device)
        marks["end"] = time.perf_counter()
        iterations.append(engine.state.iteration)

    trainer.add_event_handler(Events.GET_BATCH_COMPLETED, first_batch)
    trainer.add_event_handler(Events.GET_BATCH_STARTED, start)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, end)  # added last: runs after the bundle's own handlers
    try:
        with contextlib.redirect_stdout(sys.stderr):
            workflow.run()
    finally:
        workflow.finalize()
    if iterations != list(range(1, cfg["iterations"] + 1)):
        raise RuntimeError(f"{mode}: expected iterations 1..{cfg['iterations']}, ran {iterations}")
    expected_keys = ["image"] if mode == "none" else ["z_mu", "z_sigma"]
    if keys != expected_keys:
        raise RuntimeError(f"{mode}: the loader served {keys}, expected {expected_keys}")
    result = {
        "seconds": (marks["end"] - marks["start"]) / (cfg["iterations"] - 1),
        "setup": setup,
        "device": str(device),
        "amp_dtype": trainer.amp_dtype,
        "n_train": len(dataset),
        "n_val": len(parser.get_parsed_content("validate#dataset")),
        "scale_factor": scale_factor,
        "latent": tuple(parser.get_parsed_content("latent_shape")),
        "unet_args": dict(parser.get_parsed_content("unet_args")),
        "scale_factor_batches": parser.get_parsed_content("scale_factor_batches"),
    }
    del workflow, trainer, parser, dataset
    gc.collect()
    return result


def case_cache(cfg, dataset_dir, autoencoder_path, work, repeat):
    runs = {"none": [], "memory": []}
    for i in range(repeat):
        for mode in ("none", "memory"):  # interleaved
            print(f"case a: run {i + 1}/{repeat}, latent_cache={mode} ...", file=sys.stderr)
            runs[mode].append(bundle_run(cfg, dataset_dir, autoencoder_path, work / f"stage2_{mode}", mode))
    return runs


# ----------------------------------------------------------------------------------------------------------------
# Cases (b) and (c): the UNet's training step on random latents, mixed precision vs fp32
# ----------------------------------------------------------------------------------------------------------------


class UnetStep:
    """``LatentDiffusionTrainer._iteration`` after its latents are drawn: noise + timesteps, autocast forward, MSE,
    the finite-loss check, backward through a grad scaler (enabled for fp16 only), Adam."""

    def __init__(self, unet_args, settings, lr, device, amp_dtype):
        set_determinism(seed=SEED)  # the same initial weights in every row
        self.device, self.amp_dtype = torch.device(device), amp_dtype
        self.unet = build_unet(unet_args).to(self.device)
        self.optimizer = torch.optim.Adam(self.unet.parameters(), lr=lr)
        self.scheduler = make_scheduler(settings, "DDPM")
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        self.restore_bad = amp_dtype == torch.bfloat16  # fp16 has the scaler to skip bad steps; fp32 needs nothing
        self.steps, self.bad_steps, self.bad_params = 0, [], set()

    def __call__(self, latents):
        self.unet.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = diffusion_loss(self.unet, self.scheduler, latents, autocast_context(self.device, self.amp_dtype))
        if not torch.isfinite(loss):  # the trainer would stop here (TrainingDiverged)
            raise RuntimeError(f"{self.amp_dtype}: loss {loss.item()} at step {self.steps + 1}")
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss

    def snapshot(self):
        """Weights and Adam state before a step (taken outside the timing, bf16 only)."""
        if not self.restore_bad:
            return None
        return copy.deepcopy(self.unet.state_dict()), copy.deepcopy(self.optimizer.state_dict())

    def check(self, snapshot):
        """After a step (outside the timing): were all weight gradients finite? If not, record where, and undo the
        step (bf16 has no scaler to skip it) so the next steps start from finite weights."""
        self.steps += 1
        bad = [n for n, p in self.unet.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            self.bad_steps.append(self.steps)
            self.bad_params.update(bad)
            if snapshot is not None:
                self.unet.load_state_dict(snapshot[0])
                self.optimizer.load_state_dict(snapshot[1])


def step_speed(cfg, ae_args, size, device, mixed):
    """Seconds of each timed step of fp32 and ``mixed`` precision, interleaved, on one fixed random latent batch
    after one untimed warm-up step each, and the non-finite gradient counts."""
    latent = latent_shape(ae_args, size)
    unet_args, settings, lr = unet_values(cfg["unet"], latent)
    steps = {
        "fp32": UnetStep(unet_args, settings, lr, device, None),
        "mixed": UnetStep(unet_args, settings, lr, device, mixed),
    }
    times = {label: [] for label in steps}
    latents = torch.randn(BATCH, *latent, generator=torch.Generator().manual_seed(SEED)).to(device)
    for i in range(cfg["speed_iterations"][size] + 1):
        for label, step in steps.items():  # interleaved: fp32, mixed, fp32, mixed, ...
            snapshot = step.snapshot()
            sync(device)
            start = time.perf_counter()
            step(latents)
            sync(device)
            seconds = time.perf_counter() - start
            step.check(snapshot)
            if i:
                times[label].append(seconds)
    result = {"latent": latent, "unet_args": unet_args}
    for label, step in steps.items():
        result[label] = {
            "times": times[label],
            "steps": step.steps,
            "bad_steps": step.bad_steps,
            "bad_params": sorted(step.bad_params),
            "peak_bytes": None,
        }
    del steps, latents
    gc.collect()
    return result


def step_peak_memory(cfg, ae_args, size, device, dtype):
    """Peak CUDA memory of one precision alone: network built, one warm-up and the timed steps (bytes)."""
    latent = latent_shape(ae_args, size)
    unet_args, settings, lr = unet_values(cfg["unet"], latent)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    step = UnetStep(unet_args, settings, lr, device, dtype)
    latents = torch.randn(BATCH, *latent, generator=torch.Generator().manual_seed(SEED)).to(device)
    for _ in range(cfg["speed_iterations"][size] + 1):
        step(latents)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    del step, latents
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def case_speed(cfg, ae_args, device, mixed):
    """``{size: step_speed(...)}``; on CUDA the peak memory of each precision is measured alone, afterwards."""
    results = {}
    cuda = torch.device(device).type == "cuda"
    for size in cfg["speed_sizes"]:
        print(f"case {'c' if cuda else 'b'}: {size}³ ...", file=sys.stderr)
        results[size] = step_speed(cfg, ae_args, size, device, mixed)
        if cuda:
            for label, dtype in (("fp32", None), ("mixed", mixed)):
                results[size][label]["peak_bytes"] = step_peak_memory(cfg, ae_args, size, device, dtype)
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


def machine_header(quick, load, load_after):
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (torch.cuda.is_available() is False)"
    return [
        f"# Latent diffusion training benchmark{' (--quick)' if quick else ''}",
        "",
        f"- Machine: {cpu_name()} ({platform.machine()}), os.cpu_count() = {os.cpu_count()}, usable cores = "
        f"{usable}, torch threads = {torch.get_num_threads()}, load average (1/5/15 min) before the run = {load}, "
        f"after = {load_after}; GPU: {gpu}",
        f"- {platform.system()} {platform.release()}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"monai {monai.__version__}, ignite {ignite.__version__}, numpy {np.__version__}",
        f"- OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; native CPU bf16 (`scripts.engines.cpu_has_bf16`): "
        f"{cpu_has_bf16()}; stage 2 on CPU: `autocast_dtype(cpu, amp=True, cpu_bf16=False)` = "
        f"{autocast_dtype('cpu', True, False)} (the config's default), with `cpu_bf16=True`: "
        f"{autocast_dtype('cpu', True, True)}",
        "",
    ]


def _runs(values, digits=3):
    return "/".join(f"{v:.{digits}f}" for v in values)


def _dtype(dtype):
    return {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler", None: "fp32"}[dtype]


def mib(n_bytes):
    return "–" if n_bytes is None else f"{n_bytes / 2**20:,.0f} MiB"


def fmt_shape(shape):
    return "×".join(str(v) for v in shape)


def _finite(res, dtype):
    n, bad = res["steps"], len(res["bad_steps"])
    if dtype == torch.float16:
        return f"{n - bad}/{n} steps finite grads (GradScaler skips the others)"
    if not bad:
        return f"yes: {n}/{n} steps"
    return f"**NO**: {bad}/{n} steps had non-finite weight grads"


def speed_rows(cfg, case, label, speed, mixed):
    lines = []
    for size, res in speed.items():
        fp32, mix = min(res["fp32"]["times"]), min(res["mixed"]["times"])
        name = (
            f"{case}: {cfg['network_name']}, {size}³ grid (latent {fmt_shape(res['latent'])}), batch {BATCH}, {label}"
        )
        lines += [
            f"| {name} | UNet training step | fp32 | {fp32:.3f} s/it | 1.00× (baseline) | "
            f"{mib(res['fp32']['peak_bytes'])} | {_finite(res['fp32'], None)} |",
            f"| {name} | UNet training step | {_dtype(mixed)} | {mix:.3f} s/it | **{fp32 / mix:.2f}×** speed-up over "
            f"fp32 | {mib(res['mixed']['peak_bytes'])} | {_finite(res['mixed'], mixed)} |",
        ]
    return lines


def speed_notes(speed):
    notes = []
    for size, res in speed.items():
        notes.append(
            f"{size}³ fp32 {_runs(res['fp32']['times'])}, mixed {_runs(res['mixed']['times'])}"
            + (
                f" (non-finite at mixed steps {res['mixed']['bad_steps']}, in {len(res['mixed']['bad_params'])} "
                f"tensors, e.g. {', '.join(res['mixed']['bad_params'][:4])})"
                if res["mixed"]["bad_steps"]
                else ""
            )
        )
    return "; ".join(notes)


def print_report(cfg, quick, load, load_after, repeat, stage1, cache, cpu_speed, gpu_speed):
    none, memory = (min(r["seconds"] for r in cache[m]) for m in ("none", "memory"))
    first = cache["memory"][0]
    setup = {m: {k: min(r["setup"][k] for r in cache[m]) for k in ("train", "val", "scale_factor")} for m in cache}
    encode_extra = setup["memory"]["train"] - setup["none"]["train"]
    saved = none - memory
    if encode_extra <= 0:
        pay_back = "no extra set-up time"
    elif saved > 0:
        pay_back = f"pays back after {encode_extra / saved:.1f} iterations"
    else:
        pay_back = "never pays back"
    n, voxel = cfg["iterations"], cfg["voxel"]
    c1 = f"a: {voxel}³ data, batch {BATCH}, {n} iterations, {first['device']}"
    lines = machine_header(quick, load, load_after)
    lines += [
        "| Case | Pipeline | Precision | Seconds | Ratio | Peak GPU memory | Mixed-precision steps finite |",
        "|---|---|---|---:|---|---:|---|",
        f"| {c1} | bundle, `latent_cache='none'` (encode every step) | {_dtype(first['amp_dtype'])} | "
        f"{none:.3f} s/it | 1.00× (baseline) | – | – |",
        f"| {c1} | bundle, `latent_cache='memory'` (latents encoded once) | {_dtype(first['amp_dtype'])} | "
        f"{memory:.3f} s/it | **{none / memory:.2f}×** speed-up (none/memory) | – | – |",
        f"| {c1} | one-off: building the memory cache of {first['n_train']} training volumes | fp32 | "
        f"{setup['memory']['train']:.2f} s | {encode_extra:+.2f} s vs loading them for 'none' ("
        f"{setup['none']['train']:.2f} s): {pay_back} | – | – |",
    ]
    lines += speed_rows(cfg, "b", "CPU", cpu_speed, torch.bfloat16)
    if gpu_speed is not None:
        lines += speed_rows(cfg, "c", torch.cuda.get_device_name(), gpu_speed, torch.float16)
    unet = first["unet_args"]
    lines += [
        "",
        f"- Stage-1 checkpoint for case a (made first, not timed in the table, {stage1['seconds']:.0f} s): "
        f"{cfg['n_clouds']} clouds from `simulate_microtubules` (seed {SEED}, ~{cfg['points']:,} points) → "
        f"`write_point_clouds_h5` → `convert` to {voxel}³ (σ 1 voxel, {cfg['train_ratio']:.0%} train), then "
        f"`configs/train_autoencoder.json` for 1 epoch of {cfg['stage1_batches']} batches (`fast_dev_run`), batch "
        f"{BATCH}, with validation so `best_model.pt` is written; AutoencoderKL {_ae(stage1['args'])} (its weights "
        f"barely trained: the encoder's cost does not depend on them).",
        f"- Case a measures one epoch of {n} training iterations of `configs/train_diffusion.json` run in this "
        f"process as `ConfigWorkflow(..., workflow_type='train', **overrides)` → `initialize()` → `run()`, with "
        f"`latent_cache` 'none' or 'memory', `fast_dev_run=True`, `fast_dev_run_batches={n}`, `n_epochs=1`, "
        f"`val_interval=2` (no validation), `generate_samples_interval=1000` (no monitoring samples), batch {BATCH}, "
        f"seed {SEED}, the config's `amp=true`/`cpu_bf16=false` (trainer autocast: {_dtype(first['amp_dtype'])}), "
        f"logging, TensorBoard and checkpoint handlers, progress bar off (`TQDM_DISABLE=1`). UNet: "
        f"{_unet(unet)} on latents {fmt_shape(first['latent'])}; scale factor computed by the config "
        f"({first['scale_factor']:.4f} in the first memory run). Data: {first['n_train']} training (+ "
        f"{first['n_val']} validation) volumes; the {n} iterations make {n / max(1, first['n_train'] // BATCH):g} "
        f"pass(es) over the shuffled loader. The loader served `image` batches ('none', encoded by the frozen "
        f"autoencoder inside `sample_latents` at every step) or `z_mu`/`z_sigma` batches ('memory'): checked.",
        f"- Timing window (case a): `time.perf_counter` from the start of iteration 2 (before its batch is fetched; "
        f"ignite's `GET_BATCH_STARTED` on `workflow.parser.get_parsed_content('train#trainer')` after `initialize()`) "
        f"to the end of iteration {n} (after the bundle's own `ITERATION_COMPLETED` handlers); seconds/iteration = "
        f"window / {n - 1}. So data loading (collation of cached volumes or latents), encoding ('none'), the UNet "
        f"step and per-iteration handlers count; building the workflow, the datasets, the scale factor, iteration 1 "
        f"and the end-of-epoch checkpoint do not. Best of {repeat} runs per mode, interleaved (none, memory, none, "
        f"...); all runs (s/iteration): none {_runs([r['seconds'] for r in cache['none']])}, memory "
        f"{_runs([r['seconds'] for r in cache['memory']])}.",
        f"- One-off (case a): the time to parse `train#dataset` after its dependencies (checkpoint, frozen "
        f"autoencoder, file lists) were parsed: for 'memory' `encode_volumes` (load + resize every volume, encode "
        f"in batches of {BATCH}, keep `z_mu`/`z_sigma` on the CPU), for 'none' a `CacheDataset` of the loaded, "
        f"resized volumes. Pay-back = (memory − none set-up) / (none − memory seconds per iteration). Best of "
        f"{repeat}; all runs (s): memory train {_runs([r['setup']['train'] for r in cache['memory']], 2)}, none "
        f"train {_runs([r['setup']['train'] for r in cache['none']], 2)}; the {first['n_val']} validation volumes "
        f"add memory {setup['memory']['val']:.2f} s / none {setup['none']['val']:.2f} s (built even though "
        f"validation never runs here, as in any run), the scale factor ({first['scale_factor_batches']} batches) "
        f"memory {setup['memory']['scale_factor']:.2f} s / none {setup['none']['scale_factor']:.2f} s.",
        f"- Case b: `UnetStep` = `LatentDiffusionTrainer._iteration` after the latents are drawn (noise and "
        f"timesteps, `scheduler.add_noise`, autocast forward, fp32 MSE, finite-loss check, backward, Adam; the "
        f"GradScaler is enabled for fp16 only) on one fixed `torch.randn` latent batch of {BATCH}; the UNet is built "
        f"from the config's `unet_args` for the latent of each grid through case a's autoencoder (latents "
        f"{', '.join(fmt_shape(r['latent']) for r in cpu_speed.values())}); both precisions from the same initial "
        f"weights. One untimed warm-up step each, then the best of "
        f"{'/'.join(str(cfg['speed_iterations'][s]) for s in cfg['speed_sizes'])} timed steps (per size), fp32 and "
        f"mixed steps interleaved. All steps (s): {speed_notes(cpu_speed)}. Speed-up = fp32 time / mixed time "
        f"(> 1: mixed precision is faster).",
        "- Finite check (case b, outside the timing): after every step (warm-up included) every weight gradient is "
        "tested with `torch.isfinite`; a bf16 step with a non-finite gradient is undone (weights and Adam state "
        "restored from a copy taken before it: bf16 has no scaler to skip it) so each step starts from finite weights "
        "and the count is per step, not a cascade. In the trainer such a step would write NaN into the weights and "
        "the next step's loss would stop training (`TrainingDiverged`).",
    ]
    if gpu_speed is None:
        lines.append(
            "- Case c (GPU, fp16 autocast + GradScaler vs fp32) skipped: `torch.cuda.is_available()` is False."
        )
    else:
        lines.append(
            f"- Case c: as case b on {torch.cuda.get_device_name()} (`torch.cuda.synchronize` around each timed "
            f"step), fp16 autocast with a GradScaler (as `MixedPrecisionTrainer` on CUDA) vs fp32 (TF32: cudnn "
            f"{torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32}; after "
            f"`set_determinism` cudnn.benchmark = {torch.backends.cudnn.benchmark}, cudnn.deterministic = "
            f"{torch.backends.cudnn.deterministic}). Peak GPU memory = `torch.cuda.max_memory_allocated()` of each "
            f"precision run alone afterwards (network built, warm-up and timed steps; weights, Adam state and "
            f"activations count). All steps (s): {speed_notes(gpu_speed)}."
        )
    print("\n".join(lines))


def _ae(a):
    return (
        f"channels {list(a['channels'])}, latent {a['latent_channels']}, groups {a['norm_num_groups']}, attention "
        f"{list(a['attention_levels'])}, non-local {a['with_encoder_nonlocal_attn']}"
    )


def _unet(u):
    return (
        f"DiffusionModelUNet channels {list(u['channels'])}, attention {list(u['attention_levels'])}, heads "
        f"{list(u['num_head_channels'])}, groups {u['norm_num_groups']}, res blocks {u['num_res_blocks']}"
    )


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny networks and grids: a smoke check in seconds")
    parser.add_argument("--repeat", type=int, default=None, help="runs per cache mode in case a (default 5, quick 1)")
    parser.add_argument("--tmpdir", default=None, help="where the temporary data and outputs go (default: system)")
    args = parser.parse_args(argv)

    cfg = QUICK if args.quick else FULL
    repeat = max(1, args.repeat or (1 if args.quick else 5))
    load = load_average()
    work = Path(tempfile.mkdtemp(prefix="benchmark_diffusion-", dir=args.tmpdir))
    try:
        print(f"simulating and converting the data in {work} ...", file=sys.stderr)
        dataset_dir = make_dataset(work, cfg)
        print("stage 1: one fast epoch ...", file=sys.stderr)
        path, ae_args, seconds = train_stage1(cfg, dataset_dir, work)
        stage1 = {"path": path, "args": ae_args, "seconds": seconds}
        cache = case_cache(cfg, dataset_dir, path, work, repeat)
        cpu_speed = case_speed(cfg, ae_args, "cpu", torch.bfloat16)
        gpu_speed = case_speed(cfg, ae_args, "cuda", torch.float16) if torch.cuda.is_available() else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_report(cfg, args.quick, load, load_average(), repeat, stage1, cache, cpu_speed, gpu_speed)


if __name__ == "__main__":
    main()
