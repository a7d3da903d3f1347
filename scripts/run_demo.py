"""The built-in demo: the whole pipeline on simulated SMLM microtubules, with the commands a user would type.

Usage from the bundle root::

    python scripts/run_demo.py

Steps: simulate clouds → convert to grids → train the autoencoder → train the latent diffusion model → sample
NIfTI volumes, point clouds and a preview. Everything goes to the demo's own folders (``data/demo``,
``outputs/demo``, ``logs/demo``); re-running the demo replaces the demo's files there and nothing else.
Each command is printed before it runs, so any step can be re-run or changed by hand.
"""

import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Settings chosen for about 10 minutes on 2 CPU cores (see README.md); real data wants the config defaults.
VOXEL_SIZE = "[32,32,16]"
AUTOENCODER = {
    "voxel_size": VOXEL_SIZE,
    "num_channels": "[16,32,32]",
    "norm_num_groups": 8,
    "attention_levels": "[False,False,False]",
    "with_nonlocal_attn": False,
    "discriminator_channels": 16,
    "discriminator_num_layers": 2,
    "batch_size": 4,
    "learning_rate": 5e-4,
    "autoencoder_warm_up_n_epochs": 10,
    "num_workers": 0,
    "val_interval": 2,
    "image_log_interval": 4,
}
DIFFUSION = {
    "num_channels": "[32,64,64]",
    "attention_levels": "[False,False,True]",
    "num_head_channels": "[0,0,32]",
    "norm_num_groups": 16,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "val_interval": 10,
    "generate_samples_interval": 40,
}


def _run(args):
    print("$ " + " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], cwd=ROOT, check=True)


def _bundle(config, settings):
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"configs/{config}"]
    for key, value in settings.items():
        args += [f"--{key}", value]
    _run(args)


def run_demo(n_clouds=128, autoencoder_epochs=25, diffusion_epochs=120, num_samples=8, seed=0):
    """Run every stage of the pipeline on simulated microtubules; see the module docstring."""
    start = time.perf_counter()
    data, outputs, logs = "data/demo", "outputs/demo", "logs/demo"
    _run(
        [
            sys.executable,
            "scripts/simulate_smlm.py",
            "--output",
            f"{data}/microtubules.h5",
            "--n_clouds",
            n_clouds,
            "--seed",
            seed,
            "--overwrite",
        ]
    )
    _run(
        [
            sys.executable,
            "scripts/convert_h5_to_nifti.py",
            "--h5_file",
            f"{data}/microtubules.h5",
            "--output_dir",
            f"{data}/voxels_nifti",
            "--voxel_size",
            VOXEL_SIZE,
            "--method",
            "gaussian",
            "--sigma",
            "1.0",
            "--seed",
            seed,
            "--overwrite",
        ]
    )
    _bundle(
        "train_autoencoder.json",
        {
            **AUTOENCODER,
            "dataset_dir": f"{data}/voxels_nifti",
            "seed": seed,
            "n_epochs": autoencoder_epochs,
            "ckpt_dir": f"{outputs}/autoencoder",
            "log_dir": f"{logs}/autoencoder",
            "overwrite": "true",
        },
    )
    _bundle(
        "train_diffusion.json",
        {
            **DIFFUSION,
            "dataset_dir": f"{data}/voxels_nifti",
            "seed": seed,
            "n_epochs": diffusion_epochs,
            "ckpt_dir": f"{outputs}/diffusion",
            "log_dir": f"{logs}/diffusion",
            "autoencoder_path": f"{outputs}/autoencoder/best_model.pt",
            "overwrite": "true",
        },
    )
    _bundle(
        "inference.json",
        {
            "model_dir": outputs,
            "output_dir": f"{outputs}/samples",
            "num_samples": num_samples,
            "seed": seed,
            "overwrite": "true",
        },
    )
    print(
        f"demo finished in {time.perf_counter() - start:.0f} s: samples in {outputs}/samples "
        f"(preview.png, nifti/, pointcloud/), TensorBoard logs in {logs}"
    )


if __name__ == "__main__":
    main(run_demo)
