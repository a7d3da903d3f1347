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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from scripts.convert_h5_to_nifti import convert  # noqa: E402
from scripts.pointcloud_io import write_point_clouds_h5  # noqa: E402
from scripts.simulate_smlm import simulate_microtubules  # noqa: E402

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
    if processes > 1:
        configs.append("configs/multi_gpu_train_autoencoder.json")
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            "--log-dir",
            str(out / "ranks"),
            "--redirects",
            "3",
            "-m",
            "monai.bundle",
        ]
    else:
        launch = [sys.executable, "-m", "monai.bundle"]
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke check")
    args = parser.parse_args()
    n_clouds, voxel, epochs = (8, 16, 2) if args.quick else (24, 32, 4)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_point_clouds_h5(tmp / "mt.h5", simulate_microtubules(n_clouds, seed=0, mean_points=5000))
        info = convert(tmp / "mt.h5", tmp / "vox", voxel_size=voxel, train_ratio=0.75, seed=0)
        n_train = info["counts"]["n_train"]
        rows = []
        for processes, threads in [(1, 1), (1, 2), (2, 1)]:
            out = tmp / f"p{processes}t{threads}"
            times = _run(processes, threads, _settings(tmp / "vox", out, voxel, epochs), out)
            best = min(times)
            rows.append((processes, threads, best, n_train / best, times))
    print("# Multi-process training benchmark (CPU, gloo)\n")
    print(
        f"- Machine: {platform.processor() or platform.machine()}, os.cpu_count() = {os.cpu_count()}; "
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
    print(
        "\n- All epoch times (s): "
        + "; ".join(f"{p}×{t}: " + "/".join(f"{x:.2f}" for x in ts) for p, t, _, _, ts in rows)
    )
    print("- Epoch time as ignite logs it (rank 0): the iterations plus the end-of-epoch checkpoint.")


if __name__ == "__main__":
    main()
