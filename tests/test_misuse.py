"""The misuse table: what a new user types wrong, each run as they would run it (a subprocess from the bundle root).

Every case asserts the exit status, exactly one ``error:`` line naming the file or setting and no traceback, that
nothing in the workspace was written or replaced (every file's hash and every folder, before and after) and that no
staging folder is left. The workspace looks like a bundle root's outputs: ``data/voxels_nifti`` (a conversion),
``outputs/{autoencoder,diffusion,samples,evaluation}`` and input files under ``in/``; bundle runs get
``--bundle_root`` pointing at it, so their defaults land there too.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_AUTOENCODER, TINY_DIFFUSION, run_workflow, write_h5
from scripts.pointcloud_io import write_point_clouds_h5, write_points_csv
from scripts.simulate_smlm import simulate_microtubules

DATA = Path(__file__).parent / "data"


def _flags(settings):
    args = []
    for key, value in settings.items():
        args += [f"--{key}", str(value).replace("'", '"') if isinstance(value, list) else str(value)]
    return args


AE = _flags({k: v for k, v in TINY_AUTOENCODER.items() if k != "fast_dev_run"}) + ["--fast_dev_run", "true"]
DM = _flags({k: v for k, v in TINY_DIFFUSION.items() if k != "fast_dev_run"}) + ["--fast_dev_run", "true"]
CONVERT = [sys.executable, "scripts/convert_h5_to_nifti.py"]
SIMULATE = [sys.executable, "scripts/simulate_smlm.py"]
RENDER = [sys.executable, "scripts/render.py"]
DEMO = [sys.executable, "scripts/run_demo.py"]


@dataclass
class Case:
    name: str
    argv: list  # "{ws}" is the workspace; for bundle runs the first element is the config name
    message: str  # a regular expression the one error line must match
    config: str = None  # a bundle config: run through python -m monai.bundle run --bundle_root {ws}
    setup: object = None  # a function of the workspace, run before the command
    status: int = None

    def command(self, ws):
        argv = [a.format(ws=ws) for a in self.argv]
        if self.config is None:
            return argv
        run = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"configs/{self.config}.json"]
        return [*run, "--bundle_root", str(ws), *argv]

    def expected_status(self):
        return self.status if self.status is not None else (2 if self.config is None else 1)


# ------------------------------------------------------------------------------------------------ workspace setups


def _truncate_a_volume(ws):
    path = sorted((ws / "data" / "voxels_nifti" / "train").glob("*.nii.gz"))[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _read_only(ws, *parts):
    """A read-only folder at ``ws/parts`` (a read-only tmpfs, which binds root too; chmod where not root)."""
    path = ws.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot make a read-only folder here ({mounted.stderr.decode().strip()})")


def _other_box_data(ws):
    """A conversion of the same kind of clouds in another box (8000 × 8000 × 300 nm)."""
    from scripts.convert_h5_to_nifti import convert

    clouds = simulate_microtubules(4, seed=5, mean_points=1500, box_size_nm=[8000, 8000, 300])
    write_point_clouds_h5(ws / "in" / "other_box.h5", clouds)
    convert(ws / "in" / "other_box.h5", ws / "data" / "other_box", voxel_size=16, train_ratio=0.5)


def _existing_simulation(ws):
    write_point_clouds_h5(ws / "in" / "sim.h5", simulate_microtubules(1, seed=0, mean_points=100))


CASES = [
    # ---------------------------------------------------------------- the converter (fire; exit 2)
    Case(
        "convert unknown flag",
        [*CONVERT, "--h5_file", "{ws}/in/mt.h5", "--output_dir", "{ws}/c", "--voxelsize", "16"],
        r"--voxelsize: unknown option; did you mean voxel_size\?",
    ),
    Case(
        "convert misspelled flag with =",
        [*CONVERT, "--h5_file={ws}/in/mt.h5", "--outdir={ws}/c"],
        r"--outdir: unknown option",
    ),
    Case(
        "convert overwrite is not a boolean",
        [*CONVERT, "--h5_file", "{ws}/in/mt.h5", "--output_dir", "{ws}/c", "--overwrite", "maybe"],
        r"--overwrite: expected true or false",
    ),
    Case(
        "convert overwrite false keeps the conversion",
        [
            *CONVERT,
            "--h5_file",
            "{ws}/in/mt.h5",
            "--output_dir",
            "{ws}/data/voxels_nifti",
            "--voxel_size",
            "8",
            "--overwrite",
            "false",
        ],
        r"data/voxels_nifti: already holds a conversion .*pass --overwrite true",
    ),
    Case(
        "convert no_compression is not a boolean",
        [*CONVERT, "--h5_file", "{ws}/in/mt.h5", "--output_dir", "{ws}/c", "--no_compression", "nope"],
        r"--no_compression: expected true or false",
    ),
    Case(
        "convert strict is not a boolean",
        [*CONVERT, "--h5_file", "{ws}/in/mt.h5", "--output_dir", "{ws}/c", "--strict", "2"],
        r"--strict: expected true or false",
    ),
    Case(
        "convert missing file",
        [*CONVERT, "--h5_file", "{ws}/in/missing.h5", "--output_dir", "{ws}/c"],
        r"in/missing.h5: no such file",
    ),
    Case(
        "convert a folder as input",
        [*CONVERT, "--h5_file", "{ws}/in", "--output_dir", "{ws}/c"],
        r"/in: is a folder; give one point-cloud file",
    ),
    Case(
        "convert 2D CSV",
        [*CONVERT, "--h5_file", "{ws}/in/xy.csv", "--output_dir", "{ws}/c"],
        r"xy.csv: the points have no z \(2D data\).*--allow_2d true",
    ),
    Case(
        "convert 2D Picasso",
        [*CONVERT, "--h5_file", "{ws}/in/picasso_egfr_mols_real2d.hdf5", "--output_dir", "{ws}/c"],
        r"picasso_egfr_mols_real2d.hdf5: the points have no z",
    ),
    Case(
        "convert voxel size beyond memory",
        [*CONVERT, "--h5_file", "{ws}/in/mt.h5", "--output_dir", "{ws}/c", "--voxel_size", "100000"],
        r"voxel_size: \[100000, 100000, 100000\] needs about .* but this machine has",
    ),
    Case(
        "convert voxel size 0",
        [*CONVERT, "--h5_file", "{ws}/in/mt.h5", "--output_dir", "{ws}/c", "--voxel_size", "0"],
        r"voxel_size: expected a positive integer",
    ),
    Case(
        "convert sigma 0",
        [*CONVERT, "--h5_file", "{ws}/in/mt.h5", "--output_dir", "{ws}/c", "--sigma", "0"],
        r"sigma: must be positive",
    ),
    Case(
        "convert unknown sigma unit",
        [*CONVERT, "--h5_file", "{ws}/in/mt.h5", "--output_dir", "{ws}/c", "--sigma_unit", "furlong"],
        r"sigma_unit: expected 'voxel' or 'nm'",
    ),
    Case(
        "convert unknown method",
        [*CONVERT, "--h5_file", "{ws}/in/mt.h5", "--output_dir", "{ws}/c", "--method", "splat"],
        r"method: expected one of occupancy, density, gaussian",
    ),
    Case(
        "convert unknown normalisation",
        [*CONVERT, "--h5_file", "{ws}/in/mt.h5", "--output_dir", "{ws}/c", "--normalize", "mean"],
        r"normalize: expected one of max, percentile, none",
    ),
    Case(
        "convert train ratio 0",
        [*CONVERT, "--h5_file", "{ws}/in/mt.h5", "--output_dir", "{ws}/c", "--train_ratio", "0"],
        r"train_ratio: must be in \(0, 1\]",
    ),
    Case(
        "convert one acquisition without tiles",
        [*CONVERT, "--h5_file", "{ws}/in/ts3d_leterrier_real3d.csv", "--output_dir", "{ws}/c"],
        r"holds 1 usable cloud.*--tiles 64 --tile_size \[\d+, \d+, \d+\] fits this data",
    ),
    Case(
        "convert a box holding none of the points",
        [*CONVERT, "--h5_file", "{ws}/in/mt.h5", "--output_dir", "{ws}/c", "--volume_dims", "[100,100,100]"],
        r"no points inside the box for any of the 6 clouds",
    ),
    Case(
        "convert empty clouds with --strict",
        [
            *CONVERT,
            "--h5_file",
            "{ws}/in/far.h5",
            "--output_dir",
            "{ws}/c",
            "--volume_dims",
            "[5000,5000,600]",
            "--strict",
            "true",
        ],
        r"far.h5: no points inside the box for 1 clouds",
    ),
    Case(
        "convert unit attribute contradicts --unit",
        [*CONVERT, "--h5_file", "{ws}/in/um.h5", "--output_dir", "{ws}/c", "--unit", "nm"],
        r"um.h5: the file says its coordinates are in 'um', but --unit nm was given",
    ),
    Case(
        "convert zero workers",
        [*CONVERT, "--h5_file", "{ws}/in/mt.h5", "--output_dir", "{ws}/c", "--num_workers", "0"],
        r"num_workers: must be a positive integer",
    ),
    Case(
        "convert negative tiles",
        [*CONVERT, "--h5_file", "{ws}/in/mt.h5", "--output_dir", "{ws}/c", "--tiles", "-3"],
        r"tiles: must be a positive integer",
    ),
    Case(
        "convert output is a file",
        [*CONVERT, "--h5_file", "{ws}/in/mt.h5", "--output_dir", "{ws}/in/mt.h5"],
        r"mt.h5: --output_dir exists and is not a folder",
    ),
    Case(
        "convert into a read-only folder",
        [*CONVERT, "--h5_file", "{ws}/in/mt.h5", "--output_dir", "{ws}/ro/c"],
        r"ro/c: --output_dir cannot be written",
        setup=lambda ws: _read_only(ws, "ro"),
    ),
    Case(
        "convert unknown box anchor",
        [
            *CONVERT,
            "--h5_file",
            "{ws}/in/mt.h5",
            "--output_dir",
            "{ws}/c",
            "--volume_dims",
            "5000",
            "--box_anchor",
            "middle",
        ],
        r"box_anchor: expected one of zero, center",
    ),
    Case(
        "convert percentile 0",
        [
            *CONVERT,
            "--h5_file",
            "{ws}/in/mt.h5",
            "--output_dir",
            "{ws}/c",
            "--normalize",
            "percentile",
            "--percentile",
            "0",
        ],
        r"percentile: must be in \(0, 100\]",
    ),
    Case(
        "convert unknown key",
        [*CONVERT, "--h5_file", "{ws}/in/mt.h5", "--output_dir", "{ws}/c", "--data_key", "clouds"],
        r"key 'clouds' not found; keys in the file: actual_point_counts, point_clouds, sample_ids",
    ),
    Case(
        "convert NaN with --strict",
        [*CONVERT, "--h5_file", "{ws}/in/nan.h5", "--output_dir", "{ws}/c", "--strict", "yes"],
        r"nan.h5: cloud 0 has 1 NaN/Inf coordinates \(refused by --strict\)",
    ),
    # ---------------------------------------------------------------- simulator, renderer, demo (fire; exit 2)
    Case(
        "simulate unknown flag",
        [*SIMULATE, "--output", "{ws}/in/new.h5", "--n_cloud", "5"],
        r"--n_cloud: unknown option; did you mean n_clouds\?",
    ),
    Case(
        "simulate overwrite false keeps the file",
        [*SIMULATE, "--output", "{ws}/in/sim.h5", "--overwrite", "false"],
        r"sim.h5: already exists; pass --overwrite to replace it",
        setup=_existing_simulation,
    ),
    Case(
        "simulate overwrite is not a boolean",
        [*SIMULATE, "--output", "{ws}/in/sim.h5", "--overwrite", "perhaps"],
        r"--overwrite: expected true or false",
    ),
    Case(
        "simulate a flat box",
        [*SIMULATE, "--output", "{ws}/in/new.h5", "--box_size_nm", "[5000,5000,0]"],
        r"box_size_nm: every size must be > 0",
    ),
    Case(
        "render unknown flag",
        [*RENDER, "--input", "{ws}/in/xyz.csv", "--output", "{ws}/r.png", "--pixelnm", "5"],
        r"--pixelnm: unknown option; did you mean pixel_nm\?",
    ),
    Case(
        "render a cloud with a far outlier",
        [*RENDER, "--input", "{ws}/in/outlier.csv", "--output", "{ws}/r.png"],
        r"pixel_nm: 15 nm pixels over .* px image \(more than 40 million pixels\)",
    ),
    Case(
        "render a missing file",
        [*RENDER, "--input", "{ws}/in/none.csv", "--output", "{ws}/r.png"],
        r"none.csv: no such file",
    ),
    Case(
        "render a cloud index out of range",
        [*RENDER, "--input", "{ws}/in/mt.h5", "--index", "9", "--output", "{ws}/r.png"],
        r"mt.h5: has 6 clouds, no index 9",
    ),
    Case("demo unknown flag", [*DEMO, "--n_cloud", "5"], r"--n_cloud: unknown option; did you mean n_clouds\?"),
    # ---------------------------------------------------------------- stage 1 (python -m monai.bundle run; exit 1)
    Case(
        "stage 1 misspelled id",
        [*AE, "--n_epoch", "2"],
        r"n_epoch: no such setting .*did you mean n_epochs\?",
        "train_autoencoder",
    ),
    Case(
        "stage 1 misspelled batch size",
        [*AE, "--batchsize", "5"],
        r"batchsize: .*did you mean batch_size\?",
        "train_autoencoder",
    ),
    Case(
        "stage 1 misspelled nested id",
        [*AE, "--train#dataloader#batchsize", "5"],
        r"train#dataloader#batchsize: no such setting .*did you mean train#dataloader#batch_size\?",
        "train_autoencoder",
    ),
    Case("stage 1 amp is not a boolean", [*AE, "--amp", "maybe"], r"amp: expected true or false", "train_autoencoder"),
    Case(
        "stage 1 fast_dev_run is not a boolean",
        [*AE, "--fast_dev_run", "fast"],
        r"fast_dev_run: expected true or",
        "train_autoencoder",
    ),
    Case(
        "stage 1 batch size 0", [*AE, "--batch_size", "0"], r"batch_size: must be 1 or more, got 0", "train_autoencoder"
    ),
    Case("stage 1 zero epochs", [*AE, "--n_epochs", "0"], r"n_epochs: must be 1 or more, got 0", "train_autoencoder"),
    Case(
        "stage 1 learning rate 0",
        [*AE, "--learning_rate", "0"],
        r"learning_rate: must be more than 0",
        "train_autoencoder",
    ),
    Case(
        "stage 1 negative learning rate",
        [*AE, "--learning_rate", "-1e-4"],
        r"learning_rate: must be more than 0",
        "train_autoencoder",
    ),
    Case(
        "stage 1 cuda without CUDA",
        [*AE, "--device", "cuda"],
        r"device: cuda was asked for, but this torch .* sees no CUDA device",
        "train_autoencoder",
    ),
    Case(
        "stage 1 voxel size beyond memory",
        [*AE, "--voxel_size", "100000", "--ckpt_dir", "{ws}/new"],
        r"voxel_size: \[100000, 100000, 100000\] at batch 2 needs about .* this machine has",
        "train_autoencoder",
    ),
    Case(
        "stage 1 into a folder with checkpoints",
        [*AE],
        r"outputs/autoencoder: already holds best_model.pt and "
        r"latest_checkpoint.pt of an earlier run; resume it with --resume_from",
        "train_autoencoder",
    ),
    Case(
        "stage 1 overwrite is not a boolean",
        [*AE, "--overwrite", "replace"],
        r"overwrite: expected true or false",
        "train_autoencoder",
    ),
    Case(
        "stage 1 read-only checkpoint folder",
        [*AE, "--ckpt_dir", "{ws}/ro/ckpt"],
        r"ro/ckpt: ckpt_dir cannot be written",
        "train_autoencoder",
        setup=lambda ws: _read_only(ws, "ro"),
    ),
    Case(
        "stage 1 read-only log folder",
        [*AE, "--ckpt_dir", "{ws}/new", "--log_dir", "{ws}/ro"],
        r"ro: log_dir cannot be written",
        "train_autoencoder",
        setup=lambda ws: _read_only(ws, "ro"),
    ),
    Case(
        "stage 1 resume from a missing file",
        [*AE, "--resume_from", "{ws}/outputs/autoencoder/lastest.pt"],
        r"lastest.pt: resume_from names no such file",
        "train_autoencoder",
    ),
    Case(
        "stage 1 resume with another voxel size",
        [
            *AE,
            "--voxel_size",
            "32",
            "--resume_from",
            "{ws}/outputs/autoencoder/latest_checkpoint.pt",
            "--n_epochs",
            "2",
        ],
        r"latest_checkpoint.pt: was trained with voxel_size \[16, 16, 16\], but this run has \[32, 32, 32\]",
        "train_autoencoder",
    ),
    Case(
        "stage 1 truncated volume",
        [*AE, "--ckpt_dir", "{ws}/new"],
        r"train_0\d+.nii.gz: not a readable NIfTI volume",
        "train_autoencoder",
        setup=_truncate_a_volume,
    ),
    Case(
        "stage 1 cache rate above 1", [*AE, "--cache_rate", "2"], r"cache_rate: must be at most 1", "train_autoencoder"
    ),
    Case(
        "stage 1 unknown key metric",
        [*AE, "--key_metric", "val_dise"],
        r"key_metric: expected one of .*did you mean val_dice\?",
        "train_autoencoder",
    ),
    Case(
        "stage 1 attention levels",
        [*AE, "--attention_levels", "[false,maybe]"],
        r"attention_levels: expected true or false",
        "train_autoencoder",
    ),
    Case(
        "stage 1 missing data folder",
        [*AE, "--dataset_dir", "{ws}/data/none", "--ckpt_dir", "{ws}/new"],
        r"data/none/train: no such training folder",
        "train_autoencoder",
    ),
    Case(
        "stage 1 channels not a list",
        [*AE, "--num_channels", "16"],
        r"num_channels: expected a list",
        "train_autoencoder",
    ),
    # ---------------------------------------------------------------- stage 2
    Case(
        "stage 2 data of another box",
        [*DM, "--dataset_dir", "{ws}/data/other_box", "--ckpt_dir", "{ws}/new"],
        r"covers the box .* but the autoencoder .*autoencoder/best_model.pt was trained on",
        "train_diffusion",
        setup=_other_box_data,
    ),
    Case(
        "stage 2 zero timesteps",
        [*DM, "--num_train_timesteps", "0"],
        r"num_train_timesteps: must be 1 or more",
        "train_diffusion",
    ),
    Case(
        "stage 2 unknown latent cache",
        [*DM, "--latent_cache", "ram"],
        r"latent_cache: expected one of memory, disk, none",
        "train_diffusion",
    ),
    Case(
        "stage 2 negative scale factor",
        [*DM, "--scale_factor", "-1"],
        r"scale_factor: must be more than 0",
        "train_diffusion",
    ),
    Case(
        "stage 2 into a folder with checkpoints",
        [*DM],
        r"outputs/diffusion: already holds best_model.pt",
        "train_diffusion",
    ),
    Case(
        "stage 2 missing autoencoder",
        [*DM, "--autoencoder_path", "{ws}/outputs/ae.pt", "--ckpt_dir", "{ws}/new"],
        r"ae.pt: no such checkpoint; train stage 1 first",
        "train_diffusion",
    ),
    Case(
        "stage 2 zero inference steps",
        [*DM, "--num_inference_steps", "0"],
        r"num_inference_steps: must be 1 or more",
        "train_diffusion",
    ),
    Case(
        "stage 2 cpu_bf16 is not a boolean",
        [*DM, "--cpu_bf16", "sometimes"],
        r"cpu_bf16: expected true or false",
        "train_diffusion",
    ),
    # ---------------------------------------------------------------- sampling
    Case(
        "sample misspelled id",
        ["--num_sample", "1"],
        r"num_sample: no such setting .*did you mean num_samples\?",
        "inference",
    ),
    Case(
        "sample zero inference steps",
        ["--num_inference_steps", "0"],
        r"num_inference_steps: must be 1 or more",
        "inference",
    ),
    Case(
        "sample negative point count",
        ["--num_points", "-5", "--output_dir", "{ws}/new"],
        r"num_points: must be 1 or more, got -5",
        "inference",
    ),
    Case(
        "sample into a folder with samples",
        ["--num_samples", "1"],
        r"outputs/samples: already holds samples \(.*\); pass --overwrite true",
        "inference",
    ),
    Case(
        "sample preview is not a boolean",
        ["--preview", "sure", "--output_dir", "{ws}/new"],
        r"preview: expected true or false",
        "inference",
    ),
    Case(
        "sample unknown scheduler",
        ["--scheduler", "PNDM", "--output_dir", "{ws}/new"],
        r"scheduler: expected one of RFlow, DDPM, DDIM",
        "inference",
    ),
    Case(
        "sample unknown format",
        ["--output_formats", "[png]", "--output_dir", "{ws}/new"],
        r"output_formats: expected a list of nifti, csv, h5",
        "inference",
    ),
    Case(
        "sample into a read-only folder",
        ["--output_dir", "{ws}/ro/s"],
        r"ro/s: output_dir cannot be written",
        "inference",
        setup=lambda ws: _read_only(ws, "ro"),
    ),
    Case(
        "sample batch size 0",
        ["--batch_size", "0", "--output_dir", "{ws}/new"],
        r"batch_size: must be 1 or more",
        "inference",
    ),
    Case(
        "sample unknown export method",
        ["--method", "nearest", "--output_dir", "{ws}/new"],
        r"method: expected one of",
        "inference",
    ),
    Case(
        "sample missing checkpoints",
        ["--model_dir", "{ws}/none", "--output_dir", "{ws}/new"],
        r"none/autoencoder/best_model.pt: no such checkpoint; train stage 1 first",
        "inference",
    ),
    # ---------------------------------------------------------------- evaluation
    Case(
        "evaluate into a folder with an evaluation", [], r"outputs/evaluation: already holds an evaluation", "evaluate"
    ),
    Case(
        "evaluate misspelled id",
        ["--num_point", "64", "--output_dir", "{ws}/new"],
        r"num_point: .*did you mean num_points\?",
        "evaluate",
    ),
    Case(
        "evaluate negative EMD points",
        ["--emd_points", "-1", "--output_dir", "{ws}/new"],
        r"emd_points: must be 0 or more",
        "evaluate",
    ),
]


# ------------------------------------------------------------------------------------------------ the workspace


@pytest.fixture(scope="module")
def workspace(dataset_dir, autoencoder_ckpt, model_dir, tmp_path_factory):
    ws = tmp_path_factory.mktemp("workspace")
    shutil.copytree(dataset_dir, ws / "data" / "voxels_nifti")
    shutil.copytree(autoencoder_ckpt.parent, ws / "outputs" / "autoencoder")
    shutil.copytree(model_dir / "diffusion", ws / "outputs" / "diffusion")
    inputs = ws / "in"
    inputs.mkdir()
    write_point_clouds_h5(inputs / "mt.h5", simulate_microtubules(6, seed=2, mean_points=800))
    for name in ("ts3d_leterrier_real3d.csv", "picasso_egfr_mols_real2d.hdf5"):
        shutil.copy(DATA / name, inputs / name)
    shutil.copy(DATA / "picasso_egfr_mols_real2d.yaml.txt", inputs / "picasso_egfr_mols_real2d.yaml")
    rng = np.random.default_rng(0)
    (inputs / "xy.csv").write_text("x,y\n" + "\n".join(f"{a:.1f},{b:.1f}" for a, b in rng.uniform(0, 5000, (50, 2))))
    write_points_csv(inputs / "xyz.csv", rng.uniform(0, 5000, (100, 3)))
    write_points_csv(inputs / "outlier.csv", np.vstack([rng.uniform(0, 5000, (100, 3)), [[1e9, 10, 10]]]))
    clouds = [
        rng.uniform(0, [5000, 5000, 600], (50, 3)),
        rng.uniform(9000, 9500, (50, 3)),
        rng.uniform(0, 600, (50, 3)),
    ]
    write_point_clouds_h5(inputs / "far.h5", clouds)
    um = write_h5(inputs / "um.h5", point_clouds=rng.uniform(0, 5, (3, 40, 3)))
    import h5py

    with h5py.File(um, "a") as f:
        f.attrs["unit"] = "um"
    nan = rng.uniform(0, 1000, (3, 20, 3))
    nan[0, 4, 1] = np.nan
    write_h5(inputs / "nan.h5", point_clouds=nan)
    run_workflow(
        "inference.json",
        model_dir=str(ws / "outputs"),
        output_dir=str(ws / "outputs" / "samples"),
        num_samples=2,
        num_inference_steps=2,
    )
    evaluation = ws / "outputs" / "evaluation"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text("{}\n")
    return ws


def snapshot(root):
    """Every file's SHA-256 and every folder under ``root`` (mount points are read as they are)."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        state[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
    return state


def _unmount_all(root):
    mounts = [
        line.split()[1]
        for line in Path("/proc/mounts").read_text().splitlines()
        if line.split()[1].startswith(str(root))
    ]
    for target in sorted(mounts, reverse=True):
        subprocess.run(["umount", target], capture_output=True)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_misuse(case, workspace, tmp_path):
    if case.name == "stage 1 cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    try:
        if case.setup is not None:
            case.setup(ws)
        before = snapshot(ws)
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TQDM_DISABLE="1")
        result = subprocess.run(case.command(ws), cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        after = snapshot(ws)
    finally:
        _unmount_all(ws)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == case.expected_status(), result.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.search(case.message, errors[0]), errors[0]
    assert sorted(set(after) ^ set(before)) == []  # nothing written ...
    assert after == before  # ... nothing written, nothing replaced, no staging folder left
    assert not [p for p in after if ".staging-" in p or ".convert-" in p]


def test_the_table_is_large_and_covers_every_entry_point():
    assert len(CASES) >= 60
    assert {c.config for c in CASES} >= {None, "train_autoencoder", "train_diffusion", "inference", "evaluate"}
