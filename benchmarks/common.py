"""What the benchmarks share: the environment, the report's header and number formats, timing, data and configs.

Each benchmark puts the bundle root on ``sys.path`` and imports this module before numpy and torch: importing it
sets ``OMP_WAIT_POLICY=PASSIVE`` and ``TQDM_DISABLE=1`` (unless already set), which the OpenMP runtime and tqdm read
when they load. torch, ignite, MONAI and the bundle's scripts are imported inside the helpers that need them, so the
converter benchmark never loads torch.
"""

import argparse
import contextlib
import io
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")  # the converter's and trainers' progress bars would clutter the tables

ROOT = Path(__file__).resolve().parents[1]
SEED = 0

# The tiny networks of the tests (tests/conftest.py adds their training settings) and of --quick.
TINY_AUTOENCODER = {
    "num_channels": [8, 16],
    "norm_num_groups": 8,
    "attention_levels": [False, False],
    "with_nonlocal_attn": False,
    "discriminator_channels": 8,
    "discriminator_num_layers": 2,
}
TINY_UNET = {
    "num_channels": [8, 16],
    "attention_levels": [False, True],
    "num_head_channels": [0, 8],
    "norm_num_groups": 8,
}
TINY_REFINER = {"refiner_channels": [8, 8], "refiner_hidden": 16}

# The training benchmarks' workload (stages 1 and 2): the data (``make_dataset``) and the iterations of the timed
# epoch. 15 clouds: 12 train (6 batches of 2, so the 12 iterations go twice through the loader), 3 val; --quick: 8
# clouds, 6 train, 2 val.
BATCH = 2  # the training benchmarks' batch size
RECON_KEYS = ("l1_weight", "mse_weight", "fg_l1_weight", "fg_weight", "fg_threshold", "dice_weight")  # stage 1's loss
TRAINING = {"voxel": 32, "n_clouds": 15, "train_ratio": 0.8, "points": 10_000, "iterations": 12}
TRAINING_QUICK = {"voxel": 16, "n_clouds": 8, "train_ratio": 0.75, "points": 3_000, "iterations": 3}
# the RFlow sampling the card's stage-2 tables (recipes, scaling rows) were measured with: 20 deterministic Euler steps
EULER_SAMPLING = {"num_inference_steps": 20, "eta": 0.0}


# ----------------------------------------------------------------------------------------------------------------
# Command line, settings, temporary folder
# ----------------------------------------------------------------------------------------------------------------


def arg_parser(doc, quick_help, tmpdir=None):
    """The command line: the first line of ``doc``, ``--quick`` and, where ``tmpdir`` says what goes there,
    ``--tmpdir`` (for ``work_folder``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if tmpdir:
        parser.add_argument("--tmpdir", default=None, help=f"where the temporary {tmpdir} go (default: system)")
    return parser


def pick_config(args, quick, full):
    """A copy of the ``quick`` or the ``full`` settings, with ``--repeat`` (at least 1) where given."""
    cfg = dict(quick if args.quick else full)
    if args.repeat:
        cfg["repeat"] = max(1, args.repeat)
    return cfg


@contextlib.contextmanager
def work_folder(script, parent=None):
    """A fresh temporary folder for the data and outputs of ``script`` (under ``parent``, default: the system's),
    removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix=f"{Path(script).stem}-", dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def load_average():
    return ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def cpu_name():
    """The CPU's model name: ``platform.processor()``, or /proc/cpuinfo's where that says no more than the machine."""
    processor = platform.processor()
    if (not processor or processor == platform.machine()) and Path("/proc/cpuinfo").is_file():
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        processor = match.group(1).strip() if match else processor
    return processor or platform.machine()


def machine_header(title, quick, load, modules, note=None, versions_note="", torch_info=False, method=None):
    """The report's first lines: the title, the machine, Python's and ``modules``' versions (+ ``versions_note``),
    where ``note`` is given a line of the OMP_WAIT_POLICY setting and ``note``, and where ``method`` is given a line
    pointing to that part of the model card's "How the benchmarks measure". With ``torch_info`` the machine line also
    gives torch's threads, the load average now (after the run; ``load``: before it) and the GPU."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    machine = (
        f"- Machine: {cpu_name()} ({platform.machine()}), os.cpu_count() = {os.cpu_count()}, usable cores = {usable}"
    )
    if not torch_info:
        machine += f", load average (1/5/15 min) before the run = {load}"
    else:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (torch.cuda.is_available() is False)"
        machine += (
            f", torch threads = {torch.get_num_threads()}, load average (1/5/15 min) before the run = {load}, after = "
            f"{load_average()}; GPU: {gpu}"
        )
    versions = ", ".join(f"{module.__name__} {module.__version__}" for module in modules)
    lines = [
        f"# {title}{' (--quick)' if quick else ''}",
        "",
        machine,
        f"- {platform.system()} {platform.release()}; Python {platform.python_version()}, {versions}{versions_note}",
    ]
    if note is not None:
        lines.append(f"- OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; {note}")
    if method is not None:
        lines.append(f'- Method: docs/README.md, "How the benchmarks measure" → {method}')
    return lines + [""]


def fmt_runs(values, digits=3):
    """Every run's value, separated by ``/``."""
    return "/".join(f"{v:.{digits}f}" for v in values)


def fmt_shape(shape):
    return "×".join(str(v) for v in shape)


def mib(n_bytes):
    return "–" if n_bytes is None else f"{n_bytes / 2**20:,.0f} MiB"


def fmt_dtype(dtype, scaler=True):
    """An autocast dtype in words; ``scaler``: fp16 trains with a GradScaler (training benchmarks, not sampling)."""
    import torch

    fp16 = "fp16 autocast + GradScaler" if scaler else "fp16 autocast"
    return {torch.bfloat16: "bf16 autocast", torch.float16: fp16, None: "fp32"}[dtype]


def describe_autoencoder(a, res_blocks=False):
    return (
        f"AutoencoderKL channels {list(a['channels'])}, latent {a['latent_channels']}"
        + (f", res blocks {a['num_res_blocks']}" if res_blocks else "")
        + f", groups {a['norm_num_groups']}, attention {list(a['attention_levels'])}, non-local "
        f"{a['with_encoder_nonlocal_attn']}"
    )


def describe_unet(u):
    return (
        f"DiffusionModelUNet channels {list(u['channels'])}, attention {list(u['attention_levels'])}, heads "
        f"{list(u['num_head_channels'])}, groups {u['norm_num_groups']}, res blocks {u['num_res_blocks']}"
    )


def gpu_footnote(case, details):
    """The footnote of GPU case ``case``: the GPU's name and ``details``, or, where ``details`` is None (no CUDA),
    that the case was skipped."""
    import torch

    if details is None:
        return f"- Case {case} (GPU) skipped: `torch.cuda.is_available()` is False."
    return f"- Case {case}, {torch.cuda.get_device_name()}: {details}"


def cuda_settings():
    """The TF32 and cudnn flags in force, for the GPU footnotes."""
    import torch

    return (
        f"TF32: cudnn {torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32}; after "
        f"`set_determinism` cudnn.benchmark = {torch.backends.cudnn.benchmark}, cudnn.deterministic = "
        f"{torch.backends.cudnn.deterministic}"
    )


# ----------------------------------------------------------------------------------------------------------------
# The bundle's training steps, outside ignite's loop (what the speed cases time)
# ----------------------------------------------------------------------------------------------------------------


def _outside_the_loop(trainer, amp_dtype):
    """``trainer`` set to train at ``amp_dtype`` (None: fp32) at epoch 1, as if ignite were running it."""
    import torch

    trainer.amp_dtype = amp_dtype
    trainer.scalers = {n: torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16) for n in trainer.scalers}
    trainer.state.epoch, trainer.state.iteration = 1, 1
    return trainer


def stage1_step(autoencoder_args, discriminator_args, values, device, amp_dtype):
    """One stage-1 iteration of the bundle (``VaeGanTrainer._iteration``, the adversarial term on) as a function of
    a batch of images, with the networks built from ``*_args`` and the optimizers and losses of ``values`` (the
    parsed config's ``learning_rate``, ``discriminator_learning_rate``, ``kl_weight``, ``adv_weight`` and
    reconstruction-loss weights; defaults where missing)."""
    import torch
    from monai.losses import PatchAdversarialLoss
    from monai.networks.nets import PatchDiscriminator
    from scripts.networks.build import build_autoencoder
    from scripts.training.engines import VaeGanTrainer
    from scripts.training.losses import ReconstructionLoss

    autoencoder = build_autoencoder(autoencoder_args).to(device)
    discriminator = PatchDiscriminator(**discriminator_args).to(device)
    recon = {k: values[k] for k in RECON_KEYS if k in values}
    trainer = VaeGanTrainer(
        device,
        1,
        [None],
        autoencoder,
        discriminator,
        torch.optim.Adam(autoencoder.parameters(), lr=values.get("learning_rate", 1e-4)),
        torch.optim.Adam(discriminator.parameters(), lr=values.get("discriminator_learning_rate", 1e-4)),
        ReconstructionLoss(**recon),
        PatchAdversarialLoss(criterion="least_squares"),
        kl_weight=values.get("kl_weight", 1e-6),
        adv_weight=values.get("adv_weight", 0.01),
        warm_up_epochs=0,
        epoch_length=1,
    )
    _outside_the_loop(trainer, amp_dtype)
    return lambda images: trainer._iteration(trainer, {"image": images})


def stage2_trainer(unet_args, settings, learning_rate, device, amp_dtype):
    """The bundle's stage-2 trainer (``LatentDiffusionTrainer``) for one step at a time: see :func:`stage2_iteration`."""
    import torch
    from scripts.networks.build import build_unet
    from scripts.networks.schedulers import training_scheduler
    from scripts.training.engines import LatentDiffusionTrainer

    unet = build_unet(unet_args).to(device)
    scheduler = training_scheduler(settings)
    trainer = LatentDiffusionTrainer(
        device, 1, [None], unet, torch.optim.Adam(unet.parameters(), learning_rate), scheduler, None, 1.0, 1
    )
    return _outside_the_loop(trainer, amp_dtype)


def untrained_sampler(settings, kind, steps):
    """A ``kind`` scheduler of ``steps`` sampling steps for untrained networks, whatever objective ``settings`` name:
    the settings with the objective that ``kind`` samples (timings do not depend on the weights)."""
    from scripts.networks.schedulers import make_scheduler
    from scripts.runtime.settings import SAMPLERS

    objective = next(name for name, kinds in SAMPLERS.items() if kind in kinds)
    return make_scheduler({**settings, "objective": objective}, kind, steps)


def stage2_iteration(trainer):
    """``trainer``'s iteration (``LatentDiffusionTrainer._iteration``) as a function of a batch of latents (passed as
    the encoder's mean with zero spread, so the step uses them as they are)."""
    import torch

    return lambda latents: trainer._iteration(trainer, {"z_mu": latents, "z_sigma": torch.zeros_like(latents)})


def stage2_step(unet_args, settings, learning_rate, device, amp_dtype):
    """One stage-2 iteration of the bundle, of a new :func:`stage2_trainer`: see :func:`stage2_iteration`."""
    return stage2_iteration(stage2_trainer(unet_args, settings, learning_rate, device, amp_dtype))


def refiner_step(refiner_args, sigma_voxels, device, amp_dtype):
    """One fine-stage iteration of the bundle (``RefinerTrainer._iteration``: coupling the points to anchors, the
    flow-matching loss and the optimizer step) as a function of a batch ``{"image": grids, "points": (B, n, 3)}``."""
    import torch
    from scripts.networks.fine_stage import Refiner
    from scripts.training.fine_stage_engines import RefinerTrainer

    refiner = Refiner(**refiner_args).to(device)
    optimizer = torch.optim.Adam(refiner.parameters(), 1e-3)
    trainer = RefinerTrainer(device, 1, [None], refiner, optimizer, sigma_voxels, epoch_length=1)
    _outside_the_loop(trainer, amp_dtype)
    return lambda batch: trainer._iteration(trainer, batch)


# ----------------------------------------------------------------------------------------------------------------
# Timing, data, configs
# ----------------------------------------------------------------------------------------------------------------


def box_extent(geometry):
    """The largest side of a conversion's box (``geometry`` of its dataset_info.json) in nm: the set metrics divide
    clouds by it."""
    return max(hi - lo for lo, hi in zip(geometry["box_min_nm"], geometry["box_max_nm"]))


def sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(func, *args, **kwargs):
    """``(seconds, func(*args, **kwargs))``, timed with ``time.perf_counter``."""
    start = time.perf_counter()
    result = func(*args, **kwargs)
    return time.perf_counter() - start, result


def on_cpu_and_gpu(case, *args):
    """``case(*args, device, mixed)`` on the CPU, mixed = bf16 autocast, and where CUDA is available on the GPU,
    mixed = fp16 autocast (else None)."""
    import torch

    cpu = case(*args, "cpu", torch.bfloat16)
    return cpu, (case(*args, "cuda", torch.float16) if torch.cuda.is_available() else None)


def make_dataset(work, cfg):
    """``cfg['n_clouds']`` simulated microtubule clouds of ~``cfg['points']`` points converted to ``cfg['voxel']``³
    NIfTI grids (σ 1 voxel, ``cfg['train_ratio']`` train); returns the dataset folder."""
    from scripts.convert_h5_to_nifti import convert
    from scripts.data.pointclouds import write_point_clouds_h5
    from scripts.simulate_smlm import simulate_microtubules

    print(f"simulating and converting the data in {work} ...", file=sys.stderr)
    h5 = Path(work) / "clouds.h5"
    write_point_clouds_h5(h5, simulate_microtubules(cfg["n_clouds"], seed=SEED, mean_points=cfg["points"]))
    out = Path(work) / "voxels"
    with contextlib.redirect_stdout(io.StringIO()):  # the converter's summary line would clutter the table
        convert(h5, out, voxel_size=cfg["voxel"], sigma=1.0, train_ratio=cfg["train_ratio"], seed=SEED)
    return out


def fast_epoch(stage, dataset_dir, out_dir, batches, **settings):
    """Overrides of a training config for one fast epoch of ``batches`` batches of ``BATCH`` (seed ``SEED``) on
    ``dataset_dir``, the ``stage``'s checkpoints and logs under ``out_dir``; then ``settings``."""
    out_dir = Path(out_dir)
    return {
        "dataset_dir": str(dataset_dir),
        "ckpt_dir": str(out_dir / "outputs" / stage),
        "log_dir": str(out_dir / "logs" / stage),
        "batch_size": BATCH,
        "seed": SEED,
        "n_epochs": 1,
        "fast_dev_run": True,
        "fast_dev_run_batches": batches,
        **settings,
    }


def parse_config(config, overrides, *keys):
    """``{key: value}`` of ``keys`` parsed from ``config`` after the ``overrides`` it has keys for."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config))
    parser.update({k: v for k, v in overrides.items() if k in parser.get()})
    return {k: parser.get_parsed_content(k) for k in keys}


def unet_values(overrides, latent):
    """``(unet_args, scheduler_settings, learning_rate)`` of ``configs/train_diffusion.json`` with ``overrides`` for
    latents of shape ``latent`` (the config reads that from the stage-1 checkpoint); the UNet is checked to fit."""
    from scripts.networks.checks import check_diffusion

    config = ROOT / "configs" / "train_diffusion.json"
    keys = ("unet_args", "scheduler_settings", "learning_rate")
    values = parse_config(config, {**overrides, "latent_shape": list(latent)}, *keys)
    unet_args = dict(values["unet_args"])
    check_diffusion(unet_args, latent)
    return unet_args, dict(values["scheduler_settings"]), values["learning_rate"]


def monai_logs_to_stderr():
    """MONAI's own loggers (e.g. the workflow's "Setting logging properties ...") write to stdout: move them."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("monai"):
            for handler in logging.getLogger(name).handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                    handler.setStream(sys.stderr)


def open_workflow(config, overrides):
    """``ConfigWorkflow(config, 'train', **overrides)``, initialised, its logging on stderr (configs/logging.conf
    logs to stdout: the table stays clean)."""
    from monai.bundle import ConfigWorkflow

    monai_logs_to_stderr()
    with contextlib.redirect_stdout(sys.stderr):
        workflow = ConfigWorkflow(config_file=str(config), workflow_type="train", **overrides)
        workflow.initialize()
    return workflow


def run_workflow(workflow):
    """``run()`` then ``finalize()``, stdout to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        try:
            workflow.run()
        finally:
            workflow.finalize()


def time_iterations(trainer, device):
    """Attach the timing window to an ignite ``trainer``: from the start of iteration 2 (before its batch is fetched,
    GET_BATCH_STARTED) to the end of the last iteration's ITERATION_COMPLETED handlers (attached last: after the
    bundle's own). Returns ``seconds_per_iteration(n, what)``, to call after the run: the window / (n - 1), once it
    checked that iterations 1..n ran."""
    from ignite.engine import Events

    marks, iterations = {}, []

    def start(engine):
        if engine.state.iteration == 1:
            sync(device)
            marks["start"] = time.perf_counter()

    def end(engine):
        sync(device)
        marks["end"] = time.perf_counter()
        iterations.append(engine.state.iteration)

    def seconds_per_iteration(n, what):
        if iterations != list(range(1, n + 1)):
            raise RuntimeError(f"{what}: expected iterations 1..{n}, ran {iterations}")
        return (marks["end"] - marks["start"]) / (n - 1)

    trainer.add_event_handler(Events.GET_BATCH_STARTED, start)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, end)
    return seconds_per_iteration
