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

import copy
import gc
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root: benchmarks.common and scripts

from benchmarks import common  # noqa: E402
from benchmarks.common import BATCH, ROOT, SEED, TINY_AUTOENCODER, TINY_UNET, TRAINING, TRAINING_QUICK  # noqa: E402

# isort: split
import ignite  # noqa: E402
import monai  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ignite.engine import Events  # noqa: E402
from monai.data import CacheDataset  # noqa: E402
from monai.utils import set_determinism  # noqa: E402
from scripts.networks.checks import latent_shape  # noqa: E402
from scripts.networks.precision import autocast_dtype, cpu_has_bf16  # noqa: E402

AE_CONFIG = ROOT / "configs" / "train_autoencoder.json"
CONFIG = ROOT / "configs" / "train_diffusion.json"

# The seed's default networks are the configs' own; --quick swaps in the tests' tiny ones (tests/conftest.py).
FULL = {
    **TRAINING,
    "repeat": 5,  # runs per cache mode in case a
    "stage1_batches": 2,
    "autoencoder": {},
    "unet": {},
    "network_name": "default networks",
    "speed_sizes": (32, 64),
    "speed_iterations": {32: 15, 64: 12},  # timed iterations per precision, after one untimed warm-up each
}
QUICK = {
    **TRAINING_QUICK,
    "repeat": 1,
    "stage1_batches": 2,
    "network_name": "tiny networks",
    "autoencoder": TINY_AUTOENCODER,
    "unet": TINY_UNET,
    "speed_sizes": (16,),
    "speed_iterations": {16: 3},
}


# ----------------------------------------------------------------------------------------------------------------
# Data, stage 1, configuration
# ----------------------------------------------------------------------------------------------------------------


def train_stage1(cfg, dataset_dir, work):
    """One fast epoch of ``configs/train_autoencoder.json`` (its validation included, so best_model.pt is saved)."""
    out = Path(work) / "stage1"
    overrides = common.fast_epoch(
        "autoencoder",
        dataset_dir,
        out,
        cfg["stage1_batches"],
        voxel_size=cfg["voxel"],
        num_workers=0,
        **cfg["autoencoder"],
    )
    start = time.perf_counter()
    workflow = common.open_workflow(AE_CONFIG, overrides)
    common.run_workflow(workflow)
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
    epoch, no validation inside it and no monitoring samples."""
    return common.fast_epoch(
        "diffusion",
        dataset_dir,
        out_dir,
        cfg["iterations"],
        autoencoder_path=str(autoencoder_path),
        latent_cache=mode,
        val_interval=2,  # one validation, after the last epoch, outside the timed iterations
        generate_samples_interval=1000,  # DDIM monitoring samples: never in a 1-epoch run
        **cfg["unet"],
    )


# ----------------------------------------------------------------------------------------------------------------
# Case (a): latent cache 'memory' vs 'none', through the bundle
# ----------------------------------------------------------------------------------------------------------------


def bundle_run(cfg, dataset_dir, autoencoder_path, out_dir, mode):
    """One epoch of ``cfg['iterations']`` iterations through the config with ``latent_cache=mode``.

    Returns seconds per iteration over iterations 2..N (each from fetching its batch, ignite's GET_BATCH_STARTED,
    to the end of its ITERATION_COMPLETED handlers) and the one-off set-up times of the datasets and scale factor.
    """
    shutil.rmtree(out_dir, ignore_errors=True)
    workflow = common.open_workflow(CONFIG, stage2_overrides(cfg, dataset_dir, autoencoder_path, out_dir, mode))
    parser = workflow.parser
    # Everything the datasets depend on first (checkpoint, frozen autoencoder, file lists), so that the timed parse
    # of each dataset is its own work: loading + resizing the volumes, and encoding them when the cache is on.
    for key in ("autoencoder", "autoencoder_weights_sha256", "preprocessing", "train#datalist", "validate#datalist"):
        parser.get_parsed_content(key)
    setup = {}
    setup["train"], dataset = common.timed(parser.get_parsed_content, "train#dataset")
    setup["val"], _ = common.timed(parser.get_parsed_content, "validate#dataset")
    setup["scale_factor"], scale_factor = common.timed(parser.get_parsed_content, "scale_factor_value")
    if (mode == "none") != isinstance(dataset, CacheDataset):
        raise RuntimeError(f"latent_cache={mode!r} built a {type(dataset).__name__}")
    trainer = parser.get_parsed_content("train#trainer")
    device = trainer.state.device
    keys = []

    def first_batch(engine):
        if engine.state.iteration == 0:
            keys.extend(sorted(engine.state.batch))

    trainer.add_event_handler(Events.GET_BATCH_COMPLETED, first_batch)
    seconds_per_iteration = common.time_iterations(trainer, device)
    common.run_workflow(workflow)
    seconds = seconds_per_iteration(cfg["iterations"], mode)
    expected_keys = ["image"] if mode == "none" else ["z_mu", "z_sigma"]
    if keys != expected_keys:
        raise RuntimeError(f"{mode}: the loader served {keys}, expected {expected_keys}")
    result = {
        "seconds": seconds,
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


def case_cache(cfg, dataset_dir, autoencoder_path, work):
    runs = {"none": [], "memory": []}
    for i in range(cfg["repeat"]):
        for mode in ("none", "memory"):  # interleaved
            print(f"case a: run {i + 1}/{cfg['repeat']}, latent_cache={mode} ...", file=sys.stderr)
            runs[mode].append(bundle_run(cfg, dataset_dir, autoencoder_path, work / f"stage2_{mode}", mode))
    return runs


# ----------------------------------------------------------------------------------------------------------------
# Cases (b) and (c): the UNet's training step on random latents, mixed precision vs fp32
# ----------------------------------------------------------------------------------------------------------------


class UnetStep:
    """The bundle's stage-2 step (``LatentDiffusionTrainer._iteration``: noise + timesteps, autocast forward, MSE,
    the finite-loss check, backward through a grad scaler (enabled for fp16 only), Adam), with a check of the
    weight gradients around it (outside the timing)."""

    def __init__(self, unet_args, settings, lr, device, amp_dtype):
        set_determinism(seed=SEED)  # the same initial weights in every row
        trainer = common.stage2_trainer(unet_args, settings, lr, device, amp_dtype)
        self.unet, self.optimizer = trainer.unet, trainer.optimizer
        self.step = common.stage2_iteration(trainer)
        self.restore_bad = amp_dtype == torch.bfloat16  # fp16 has the scaler to skip bad steps; fp32 needs nothing
        self.steps, self.bad_steps, self.bad_params = 0, [], set()

    def __call__(self, latents):
        return self.step(latents)

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
    unet_args, settings, lr = common.unet_values(cfg["unet"], latent)
    steps = {
        "fp32": UnetStep(unet_args, settings, lr, device, None),
        "mixed": UnetStep(unet_args, settings, lr, device, mixed),
    }
    times = {label: [] for label in steps}
    latents = torch.randn(BATCH, *latent, generator=torch.Generator().manual_seed(SEED)).to(device)
    for i in range(cfg["speed_iterations"][size] + 1):
        for label, step in steps.items():  # interleaved: fp32, mixed, fp32, mixed, ...
            snapshot = step.snapshot()
            common.sync(device)
            start = time.perf_counter()
            step(latents)
            common.sync(device)
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
    unet_args, settings, lr = common.unet_values(cfg["unet"], latent)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    step = UnetStep(unet_args, settings, lr, device, dtype)
    latents = torch.randn(BATCH, *latent, generator=torch.Generator().manual_seed(SEED)).to(device)
    for _ in range(cfg["speed_iterations"][size] + 1):
        step(latents)
    common.sync(device)
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
        latent = common.fmt_shape(res["latent"])
        name = f"{case}: {cfg['network_name']}, {size}³ grid (latent {latent}), batch {BATCH}, {label}"
        lines += [
            f"| {name} | UNet training step | fp32 | {fp32:.3f} s/it | 1.00× (baseline) | "
            f"{common.mib(res['fp32']['peak_bytes'])} | {_finite(res['fp32'], None)} |",
            f"| {name} | UNet training step | {common.fmt_dtype(mixed)} | {mix:.3f} s/it | **{fp32 / mix:.2f}×** "
            f"speed-up over fp32 | {common.mib(res['mixed']['peak_bytes'])} | {_finite(res['mixed'], mixed)} |",
        ]
    return lines


def speed_notes(speed):
    notes = []
    for size, res in speed.items():
        notes.append(
            f"{size}³ fp32 {common.fmt_runs(res['fp32']['times'])}, mixed {common.fmt_runs(res['mixed']['times'])}"
            + (
                f" (non-finite at mixed steps {res['mixed']['bad_steps']}, in {len(res['mixed']['bad_params'])} "
                f"tensors, e.g. {', '.join(res['mixed']['bad_params'][:4])})"
                if res["mixed"]["bad_steps"]
                else ""
            )
        )
    return "; ".join(notes)


def print_report(cfg, quick, load, stage1, cache, cpu_speed, gpu_speed):
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
    note = (
        f"native CPU bf16 (`scripts.networks.precision.cpu_has_bf16`): {cpu_has_bf16()}; stage 2 on CPU: "
        f"`autocast_dtype(cpu, amp=True, cpu_bf16=False)` = {autocast_dtype('cpu', True, False)} (the config's "
        f"default), with `cpu_bf16=True`: {autocast_dtype('cpu', True, True)}"
    )
    modules = (torch, monai, ignite, np)
    title = "Latent diffusion training benchmark"
    lines = common.machine_header(title, quick, load, modules, note, torch_info=True, method="Stage 2")
    lines += [
        "| Case | Pipeline | Precision | Seconds | Ratio | Peak GPU memory | Mixed-precision steps finite |",
        "|---|---|---|---:|---|---:|---|",
        f"| {c1} | bundle, `latent_cache='none'` (encode every step) | {common.fmt_dtype(first['amp_dtype'])} | "
        f"{none:.3f} s/it | 1.00× (baseline) | – | – |",
        f"| {c1} | bundle, `latent_cache='memory'` (latents encoded once) | {common.fmt_dtype(first['amp_dtype'])} | "
        f"{memory:.3f} s/it | **{none / memory:.2f}×** speed-up (none/memory) | – | – |",
        f"| {c1} | one-off: building the memory cache of {first['n_train']} training volumes | fp32 | "
        f"{setup['memory']['train']:.2f} s | {encode_extra:+.2f} s vs loading them for 'none' ("
        f"{setup['none']['train']:.2f} s): {pay_back} | – | – |",
    ]
    lines += speed_rows(cfg, "b", "CPU", cpu_speed, torch.bfloat16)
    if gpu_speed is not None:
        lines += speed_rows(cfg, "c", torch.cuda.get_device_name(), gpu_speed, torch.float16)
    passes = n / max(1, first["n_train"] // BATCH)
    lines += [
        "",
        f"- Stage-1 checkpoint ({stage1['seconds']:.0f} s, untimed): {cfg['n_clouds']} clouds of ~{cfg['points']:,} "
        f"points at {voxel}³, {cfg['stage1_batches']} batches; {common.describe_autoencoder(stage1['args'])}.",
        f"- Case a: {common.describe_unet(first['unet_args'])} on latents {common.fmt_shape(first['latent'])}; scale "
        f"factor {first['scale_factor']:.4f}; {first['n_train']} training + {first['n_val']} validation volumes, "
        f"{passes:g} pass(es) over the loader. All runs (s/iteration): none "
        f"{common.fmt_runs([r['seconds'] for r in cache['none']])}, memory "
        f"{common.fmt_runs([r['seconds'] for r in cache['memory']])}.",
        f"- One-off, all runs (s): memory train {common.fmt_runs([r['setup']['train'] for r in cache['memory']], 2)}, "
        f"none train {common.fmt_runs([r['setup']['train'] for r in cache['none']], 2)}; validation volumes memory "
        f"{setup['memory']['val']:.2f} / none {setup['none']['val']:.2f}; scale factor "
        f"({first['scale_factor_batches']} batches) memory {setup['memory']['scale_factor']:.2f} / none "
        f"{setup['none']['scale_factor']:.2f}.",
        f"- Case b, all steps (s): {speed_notes(cpu_speed)}.",
    ]
    gpu = None
    if gpu_speed is not None:
        gpu = f"{common.cuda_settings()}. All steps (s): {speed_notes(gpu_speed)}."
    lines.append(common.gpu_footnote("c", gpu))
    print("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = common.arg_parser(__doc__, "tiny networks and grids: a smoke check in seconds", "data and outputs")
    parser.add_argument("--repeat", type=int, default=None, help="runs per cache mode in case a (default 5, quick 1)")
    args = parser.parse_args(argv)

    cfg = common.pick_config(args, QUICK, FULL)
    load = common.load_average()
    with common.work_folder(__file__, args.tmpdir) as work:
        dataset_dir = common.make_dataset(work, cfg)
        print("stage 1: one fast epoch ...", file=sys.stderr)
        path, ae_args, seconds = train_stage1(cfg, dataset_dir, work)
        stage1 = {"path": path, "args": ae_args, "seconds": seconds}
        cache = case_cache(cfg, dataset_dir, path, work)
        cpu_speed, gpu_speed = common.on_cpu_and_gpu(case_speed, cfg, ae_args)
    print_report(cfg, args.quick, load, stage1, cache, cpu_speed, gpu_speed)


if __name__ == "__main__":
    main()
