"""Training throughput with 1 and 2 torchrun processes on CPU (gloo), the same tiny stage-1 workload.

Run from the bundle root::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/benchmark_multi_gpu.py [--quick]

Each configuration runs ``configs/train_autoencoder.json`` (+ ``configs/multi_gpu_train_autoencoder.json`` under
torchrun) for a few epochs without validation; samples/s is the number of training volumes divided by the
time ignite reports for each epoch after the first (all ranks together see every volume once per epoch).
On a 2-core machine two processes compete for the same cores as one process with two threads: the point is that
the DDP machinery works and what its overhead costs, not a speed-up.
"""

import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root: benchmarks.common and scripts

from benchmarks import common  # noqa: E402
from benchmarks.common import ROOT  # noqa: E402

# isort: split
import torch  # noqa: E402

EPOCH = re.compile(r"Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):([\d.]+)")


def _settings(data, out, voxel, epochs):
    return {
        "dataset_dir": data,
        "ckpt_dir": out / "ckpt",
        "log_dir": out / "logs",
        "voxel_size": voxel,
        "num_channels": "[16,32,32]",
        "norm_num_groups": 8,
        "attention_levels": "[False,False,False]",
        "with_nonlocal_attn": False,
        "discriminator_channels": 16,
        "discriminator_num_layers": 2,
        "batch_size": 2,
        "num_workers": 0,
        "n_epochs": epochs,
        "val_interval": 1000,
        "autoencoder_warm_up_n_epochs": 0,
    }


def _run(processes, threads, settings, out):
    configs = ["configs/train_autoencoder.json"]
    launch = [sys.executable, "-m", "monai.bundle"]
    if processes > 1:
        configs.append("configs/multi_gpu_train_autoencoder.json")
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        launch = torchrun + ["--log-dir", str(out / "ranks"), "--redirects", "3", "-m", "monai.bundle"]
    args = launch + ["run", "--config_file", str(configs)]
    for key, value in settings.items():
        args += [f"--{key}", str(value)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"run failed:\n{result.stderr[-3000:]}")
    logs = result.stdout + result.stderr
    if processes > 1:
        logs = "".join(p.read_text() for p in (out / "ranks").rglob("*.log") if p.parent.name == "0")
    times = {int(m[0]): int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) for m in EPOCH.findall(logs)}
    return [t for epoch, t in sorted(times.items()) if epoch > 1]


def main():
    args = common.arg_parser(__doc__, "tiny sizes, a smoke check").parse_args()
    n_clouds, voxel, epochs = (8, 16, 2) if args.quick else (24, 32, 4)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = common.make_dataset(tmp, {"n_clouds": n_clouds, "points": 5000, "voxel": voxel, "train_ratio": 0.75})
        n_train = len(list((data / "train").glob("*.nii*")))
        rows = []
        for processes, threads in [(1, 1), (1, 2), (2, 1)]:
            out = tmp / f"p{processes}t{threads}"
            times = _run(processes, threads, _settings(data, out, voxel, epochs), out)
            best = min(times)
            rows.append((processes, threads, best, n_train / best, times))
    print("# Multi-process training benchmark (CPU, gloo)\n")
    print(
        f"- Machine: {common.cpu_name()}, os.cpu_count() = {os.cpu_count()}; "
        f"torch {torch.__version__}; Python {platform.python_version()}"
    )
    print(
        f"- Workload: stage 1, {n_train} training volumes of {voxel}³, batch 2 per process, AutoencoderKL "
        "[16,32,32], 2-layer discriminator, adversarial on, no validation; epochs after the first are timed.\n"
    )
    print("| processes | threads each | seconds/epoch (best) | samples/s | vs 1 process × 2 threads |")
    print("|---:|---:|---:|---:|---:|")
    reference = next(r for r in rows if r[:2] == (1, 2))[3]
    for processes, threads, best, rate, _ in rows:
        print(f"| {processes} | {threads} | {best:.2f} | {rate:.2f} | {rate / reference:.2f}× |")
    print("\n- All epoch times (s): " + "; ".join(f"{p}×{t}: {common.fmt_runs(ts, 2)}" for p, t, _, _, ts in rows))
    print("- Epoch time as ignite logs it (rank 0): the iterations plus the end-of-epoch checkpoint.")


if __name__ == "__main__":
    main()
