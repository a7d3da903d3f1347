"""Benchmark stage-1 training (``configs/train_autoencoder.json``) against a plain PyTorch loop of the same step.

Run from the bundle root::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/benchmark_autoencoder.py [--quick]

Cases: (1) the bundle (``ConfigWorkflow`` on the config, ``VaeGanTrainer``, its handlers and MONAI data pipeline)
against a plain loop of the same generator + discriminator step (``VaeGanTrainer._iteration``, called without
ignite's engine) over the same volumes held in memory:
seconds per training iteration, data loading between iterations included, start-up excluded; (2) the seed's
default network on this CPU: one generator + discriminator step at batch 2 on 32³ and 64³ grids, bf16 autocast vs
fp32; (3) where CUDA is available, the same on the GPU with fp16 autocast + GradScaler vs fp32, with peak memory.

``--quick`` runs every case with the tests' tiny network on 16³ grids for 3 iterations: a smoke check of the script,
not a measurement (such a small step is dominated by per-call overheads and by whoever else uses the cores).
"""

import gc
import itertools
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root: benchmarks.common and scripts

from benchmarks import common  # noqa: E402
from benchmarks.common import BATCH, RECON_KEYS, ROOT, SEED, TINY_AUTOENCODER, TRAINING, TRAINING_QUICK  # noqa: E402

# isort: split
import ignite  # noqa: E402
import monai  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.utils import set_determinism  # noqa: E402
from scripts.networks.precision import autocast_dtype, cpu_has_bf16  # noqa: E402

CONFIG = ROOT / "configs" / "train_autoencoder.json"

# The seed's default network is the config's own; --quick swaps in the tests' tiny one (tests/conftest.py).
FULL = {
    **TRAINING,
    "repeat": 3,  # runs per pipeline in case 1
    "network": {},
    "network_name": "default network",
    "speed_sizes": (32, 64),
    "speed_iterations": {32: 3, 64: 2},  # timed iterations after one untimed warm-up
}
QUICK = {
    **TRAINING_QUICK,
    "repeat": 2,
    "network_name": "tiny network",
    "network": TINY_AUTOENCODER,
    "speed_sizes": (16,),
    "speed_iterations": {16: 3},
}


# ----------------------------------------------------------------------------------------------------------------
# Configuration, data
# ----------------------------------------------------------------------------------------------------------------


def bundle_overrides(cfg, dataset_dir, out_dir):
    """What the benchmark changes in the config: the data, the outputs, one short epoch, no validation inside it."""
    return common.fast_epoch(
        "autoencoder",
        dataset_dir,
        out_dir,
        cfg["iterations"],
        voxel_size=cfg["voxel"],
        autoencoder_warm_up_n_epochs=0,  # the adversarial term and the discriminator step from iteration 1
        num_workers=0,
        val_interval=2,  # one validation, after the last epoch, outside the timed iterations
        **cfg["network"],
    )


def config_values(overrides):
    """The settings the config builds for the networks, optimizers and losses, parsed with the same overrides."""
    keys = ("autoencoder_args", "discriminator_args", "learning_rate", "discriminator_learning_rate", *RECON_KEYS)
    keys += ("kl_weight", "adv_weight", "perceptual_weight", "perceptual_weights_path", "batch_size", "amp", "seed")
    values = common.parse_config(CONFIG, overrides, *keys)
    if values["perceptual_weight"] and values["perceptual_weights_path"]:
        raise RuntimeError("the config turns the perceptual loss on; the plain loop does not reproduce it")
    return values


def bundle_step(values, device, amp_dtype):
    """The bundle's stage-1 step (``VaeGanTrainer._iteration``) for the parsed config's ``values``, without ignite."""
    return common.stage1_step(values["autoencoder_args"], values["discriminator_args"], values, device, amp_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Case 1: bundle vs plain loop
# ----------------------------------------------------------------------------------------------------------------


def bundle_run(cfg, dataset_dir, out_dir):
    """One epoch of ``cfg['iterations']`` iterations through the config; seconds per iteration over iterations
    2..N, each from fetching its batch (ignite's GET_BATCH_STARTED) to the end of its ITERATION_COMPLETED
    handlers."""
    shutil.rmtree(out_dir, ignore_errors=True)
    workflow = common.open_workflow(CONFIG, bundle_overrides(cfg, dataset_dir, out_dir))
    trainer = workflow.parser.get_parsed_content("train#trainer")
    device = trainer.state.device
    seconds_per_iteration = common.time_iterations(trainer, device)
    common.run_workflow(workflow)
    seconds = seconds_per_iteration(cfg["iterations"], "bundle")
    if trainer.amp_dtype != autocast_dtype(device, True):
        raise RuntimeError(f"bundle trained with {trainer.amp_dtype}, expected {autocast_dtype(device, True)}")
    del workflow, trainer
    gc.collect()
    return seconds, str(device)


def load_volumes(folder):
    """Every training volume, read once with nibabel, as a (1, X, Y, Z) float32 tensor."""
    files = sorted(p for p in Path(folder).iterdir() if p.name.endswith((".nii", ".nii.gz")))
    return [torch.from_numpy(nib.load(str(p)).get_fdata(dtype=np.float32))[None] for p in files]


def plain_run(cfg, values, volumes, device):
    """The same training by hand: the same number of iterations and the same timing window as ``bundle_run``."""
    set_determinism(seed=values["seed"])  # as the config's "initialize" does
    step = bundle_step(values, device, autocast_dtype(device, values["amp"]))
    loader = torch.utils.data.DataLoader(volumes, batch_size=values["batch_size"], shuffle=True, num_workers=0)
    batches = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())  # a new pass when one ends
    step(next(batches).to(device))  # iteration 1: untimed, as in the bundle
    common.sync(device)
    start = time.perf_counter()
    for _ in range(cfg["iterations"] - 1):
        step(next(batches).to(device))
    common.sync(device)
    seconds = (time.perf_counter() - start) / (cfg["iterations"] - 1)
    del step, loader
    gc.collect()
    return seconds


def case_bundle_vs_plain(cfg, work):
    dataset_dir = common.make_dataset(work, cfg)
    values = config_values(bundle_overrides(cfg, dataset_dir, work / "bundle"))
    volumes = load_volumes(dataset_dir / "train")
    if any(tuple(v.shape[1:]) != (cfg["voxel"],) * 3 for v in volumes):
        raise RuntimeError(f"expected {cfg['voxel']}³ volumes, got {sorted({tuple(v.shape) for v in volumes})}")
    runs = {"bundle": [], "plain": []}
    device = None
    for i in range(cfg["repeat"]):
        print(f"case 1: run {i + 1}/{cfg['repeat']} ...", file=sys.stderr)
        seconds, device = bundle_run(cfg, dataset_dir, work / "bundle")
        runs["bundle"].append(seconds)
        runs["plain"].append(plain_run(cfg, values, volumes, device))
    return {
        "runs": runs,
        "device": device,
        "n_train": len(volumes),
        "n_val": len(list((dataset_dir / "val").glob("*.nii*"))),
        "amp_dtype": autocast_dtype(device, values["amp"]),
        "values": values,
    }


# ----------------------------------------------------------------------------------------------------------------
# Cases 2 and 3: the default network's step, mixed precision vs fp32
# ----------------------------------------------------------------------------------------------------------------


def step_speed(values, size, device, amp_dtype, n_timed):
    """Seconds of each of ``n_timed`` steps on one fixed random batch after one untimed warm-up step, and the peak
    CUDA memory allocated (bytes; None on CPU)."""
    set_determinism(seed=SEED)
    step = bundle_step(values, device, amp_dtype)
    images = torch.rand(BATCH, 1, size, size, size, device=device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step(images)
    times = []
    for _ in range(n_timed):
        common.sync(device)
        start = time.perf_counter()
        step(images)
        common.sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    del step, images
    gc.collect()
    return {"times": times, "peak_bytes": peak}


def case_speed(cfg, values, device, mixed):
    """``{size: {"mixed": ..., "fp32": ...}}``, the two precisions interleaved per size."""
    results = {}
    for size in cfg["speed_sizes"]:
        results[size] = {}
        for label, dtype in (("mixed", mixed), ("fp32", None)):
            print(f"case {'3' if torch.device(device).type == 'cuda' else '2'}: {size}³ {label} ...", file=sys.stderr)
            results[size][label] = step_speed(values, size, device, dtype, cfg["speed_iterations"][size])
    return results


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def _network(values):
    d = values["discriminator_args"]
    return (
        f"{common.describe_autoencoder(values['autoencoder_args'], res_blocks=True)}; PatchDiscriminator "
        f"{d['channels']} channels, {d['num_layers_d']} layers, {d['norm']} norm"
    )


def speed_rows(cfg, case, label, speed, mixed):
    lines = []
    for size, res in speed.items():
        fp32, mix = min(res["fp32"]["times"]), min(res["mixed"]["times"])
        name = f"{case}: {cfg['network_name']}, {size}³, batch {BATCH}, {label}"
        lines += [
            f"| {name} | G + D step | fp32 | {fp32:.3f} | 1.00× (baseline) | {common.mib(res['fp32']['peak_bytes'])} |",
            f"| {name} | G + D step | {common.fmt_dtype(mixed)} | {mix:.3f} | **{fp32 / mix:.2f}×** speed-up over "
            f"fp32 | {common.mib(res['mixed']['peak_bytes'])} |",
        ]
    return lines


def speed_runs(speed):
    return "; ".join(
        f"{size}³ fp32 {common.fmt_runs(res['fp32']['times'])}, mixed {common.fmt_runs(res['mixed']['times'])}"
        for size, res in speed.items()
    )


def print_report(cfg, quick, load, case1, cpu_speed, gpu_speed):
    bundle, plain = min(case1["runs"]["bundle"]), min(case1["runs"]["plain"])
    ratio = bundle / plain
    verdict = "OK" if ratio <= 1.10 else "ABOVE TARGET"
    n, voxel = cfg["iterations"], cfg["voxel"]
    c1 = f"1: {voxel}³, batch {BATCH}, {n} iterations, {case1['device']}"
    note = (
        f"native CPU bf16 (`scripts.networks.precision.cpu_has_bf16`): {cpu_has_bf16()}, so `autocast_dtype(cpu, amp=True)` = "
        f"{autocast_dtype('cpu', True)}"
    )
    modules = (torch, monai, ignite, np, nib)
    title = "Autoencoder training benchmark"
    lines = common.machine_header(title, quick, load, modules, note, torch_info=True, method="Stage 1")
    lines += [
        "| Case | Pipeline | Precision | Seconds/iteration | Ratio | Peak GPU memory |",
        "|---|---|---|---:|---|---:|",
        f"| {c1} | plain PyTorch loop | {common.fmt_dtype(case1['amp_dtype'])} | {plain:.3f} | 1.00× (baseline) | – |",
        f"| {c1} | bundle (`ConfigWorkflow`, `VaeGanTrainer`) | {common.fmt_dtype(case1['amp_dtype'])} | {bundle:.3f} "
        f"| **{ratio:.3f}×** bundle/plain ({verdict}, target ≤ 1.10) | – |",
    ]
    lines += speed_rows(cfg, 2, "CPU", cpu_speed, torch.bfloat16)
    if gpu_speed is not None:
        lines += speed_rows(cfg, 3, torch.cuda.get_device_name(), gpu_speed, torch.float16)
    passes = n / max(1, case1["n_train"] // BATCH)
    lines += [
        "",
        f"- Case 1: {case1['n_train']} training + {case1['n_val']} validation volumes, {passes:g} pass(es) over the "
        f"loader; {_network(case1['values'])}. All runs (s/iteration): bundle {common.fmt_runs(case1['runs']['bundle'])}, "
        f"plain {common.fmt_runs(case1['runs']['plain'])}.",
        f"- Case 2, all steps (s): {speed_runs(cpu_speed)}.",
    ]
    gpu = None
    if gpu_speed is not None:
        gpu = f"{common.cuda_settings()}. All steps (s): {speed_runs(gpu_speed)}."
    lines.append(common.gpu_footnote(3, gpu))
    print("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = common.arg_parser(__doc__, "tiny network and grids: a smoke check in seconds", "data and outputs")
    parser.add_argument("--repeat", type=int, default=None, help="runs per pipeline in case 1 (default 3, quick 2)")
    args = parser.parse_args(argv)

    cfg = common.pick_config(args, QUICK, FULL)
    load = common.load_average()
    with common.work_folder(__file__, args.tmpdir) as work:
        case1 = case_bundle_vs_plain(cfg, work)
        # cases 2 and 3: the network the config builds (the tiny one with --quick)
        cpu_speed, gpu_speed = common.on_cpu_and_gpu(case_speed, cfg, case1["values"])
    print_report(cfg, args.quick, load, case1, cpu_speed, gpu_speed)


if __name__ == "__main__":
    main()
