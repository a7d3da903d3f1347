"""The misuse table: what a new user types wrong, each run as they would run it (a subprocess from the bundle root).

Every case asserts the exit status, exactly one ``error:`` line naming the file or setting and no traceback, that
nothing in the workspace was written or replaced (every file's hash and every folder, before and after) and that no
staging folder is left. The workspace looks like a bundle root's outputs: ``data/voxels_nifti`` (a conversion),
``outputs/{autoencoder,diffusion,samples,evaluation}`` and input files under ``in/``; bundle runs get
``--bundle_root`` pointing at it, so their defaults land there too.
"""

import hashlib
import json
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
from scripts.data.pointclouds import write_point_clouds_h5, write_points_csv
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
REFINE = [sys.executable, "scripts/refine.py", "--refiner", str(ROOT / "models" / "model_refiner.pt")]
PUBLISH = [sys.executable, "scripts/weights.py"]
EXPORT = [sys.executable, "-m", "monai.bundle", "ckpt_export", "--config_file", "configs/inference.json"]


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


def _grids(ws):
    """Grids at the shipped fine stage's voxels: a sound one, one with NaN and Inf voxels, one with negative voxels
    and one of zeros."""
    from scripts.data.geometry import GridGeometry
    from scripts.data.nifti import save_nifti

    shipped = json.loads((ROOT / "models" / "checkpoints.json").read_text())["model_refiner.pt"]["checkpoint"]
    shape = tuple(shipped["dataset_info"]["geometry"]["shape"])
    geometry = GridGeometry((0.0, 0.0, -300.0), (5000.0, 5000.0, 300.0), shape)
    sound = np.random.default_rng(3).random(shape).astype(np.float32) ** 6
    broken = sound.copy()
    broken[[1, 7], [2, 9], [3, 4]] = [np.nan, np.inf]
    negative = sound.copy()
    negative[5:8, 5, 5] = -0.2
    for name, grid in [("sound", sound), ("nan", broken), ("negative", negative), ("zeros", np.zeros_like(sound))]:
        save_nifti(ws / "in" / f"grid_{name}.nii.gz", grid, geometry)


def _shipped_demo_set(ws):
    """The demo's weights in ``ws/models`` as the bundle ships them: a set with a fine stage, and no manifest."""
    shutil.copytree(ROOT / "models", ws / "models")


def _published(ws):
    """The workspace's trained weights published to ``ws/models`` (no fine stage)."""
    from scripts.networks.trained import publish

    publish(ws / "outputs", ws / "models")


def _published_without_info(ws):
    _published(ws)
    (ws / "models" / "checkpoints.json").unlink()


def _published_beside_a_stray_refiner(ws):
    _published(ws)
    shutil.copy(ROOT / "models" / "model_refiner.pt", ws / "models" / "model_refiner.pt")


def _degenerate_clouds(ws):
    """A file of one point, one with a cloud of identical points, a 3D CSV whose z never changes, and reference
    clouds of a 3 µm box (the workspace's model was trained on 5 µm clouds) and of one point."""
    rng = np.random.default_rng(7)
    write_point_clouds_h5(ws / "in" / "onepoint.h5", [np.array([[1200.0, 800.0, 40.0]])])
    write_point_clouds_h5(ws / "in" / "stacked.h5", [rng.uniform(0, 4000, (60, 3)), np.full((25, 3), 250.0)])
    write_points_csv(ws / "in" / "flat.csv", np.column_stack([rng.uniform(0, 4000, (80, 2)), np.full(80, 7.0)]))
    small = simulate_microtubules(3, seed=4, mean_points=300, box_size_nm=[3000, 3000, 600])
    write_point_clouds_h5(ws / "in" / "ref_3um.h5", small)
    write_points_csv(ws / "in" / "ref_one.csv", np.array([[2500.0, 2500.0, 0.0]]))


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
        "convert a file of one point",
        [*CONVERT, "--h5_file", "{ws}/in/onepoint.h5", "--output_dir", "{ws}/c"],
        r"onepoint.h5: cloud 0 has a single point; a grid needs at least 2 distinct points per cloud",
        setup=_degenerate_clouds,
    ),
    Case(
        "convert a cloud of identical points",
        [*CONVERT, "--h5_file", "{ws}/in/stacked.h5", "--output_dir", "{ws}/c"],
        r"stacked.h5: cloud 1 has 25 points, all at one position \(1 distinct point\)",
        setup=_degenerate_clouds,
    ),
    Case(
        "convert 3D CSV whose z never changes",
        [*CONVERT, "--h5_file", "{ws}/in/flat.csv", "--output_dir", "{ws}/c"],
        r"flat.csv: the points have no z \(2D data: every z is 7 nm\).*--allow_2d true",
        setup=_degenerate_clouds,
    ),
    Case(
        "convert tiles larger than the data",
        [
            *CONVERT,
            "--h5_file",
            "{ws}/in/xyz.csv",
            "--output_dir",
            "{ws}/c",
            "--tiles",
            "8",
            "--tile_size",
            "[6000,6000,800]",
        ],
        r"tile_size: tiles of \[6000, 6000\] nm cover \d+ % of the data's .*xyz.csv, so training and validation "
        r"tiles would hold the same points; use smaller tiles \(--tile_size \[\d+, \d+, 800\] fits this data\)",
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
        "render an unknown view",
        [*RENDER, "--input", "{ws}/in/xyz.csv", "--output", "{ws}/r.png", "--view", "zx"],
        r"view: expected one of xy, xz, yz, got 'zx'",
    ),
    Case(
        "render a cloud index out of range",
        [*RENDER, "--input", "{ws}/in/mt.h5", "--index", "9", "--output", "{ws}/r.png"],
        r"mt.h5: has 6 clouds, no index 9",
    ),
    Case("demo unknown flag", [*DEMO, "--n_cloud", "5"], r"--n_cloud: unknown option; did you mean n_clouds\?"),
    Case(
        "demo into a bundle's own outputs",
        [*DEMO, "--input", "{ws}/in/mt.h5", "--output_dir", "{ws}"],
        r"data/voxels_nifti: holds files the demo did not write \(.*\); the demo replaces only its own output, so "
        r"choose another --output_dir",
    ),
    Case(
        "demo on a file of one point",
        [*DEMO, "--input", "{ws}/in/onepoint.h5", "--output_dir", "{ws}/demo"],
        r"onepoint.h5: cloud 0 has a single point",
        setup=_degenerate_clouds,
    ),
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
    Case(
        "stage 1 truncated volume read by a worker",
        [*AE, "--ckpt_dir", "{ws}/new", "--cache_rate", "0", "--num_workers", "2", "--batch_size", "6"],
        r"^error: /\S+/train_0\d+.nii.gz: not a readable NIfTI volume \(EOFError",
        "train_autoencoder",
        setup=_truncate_a_volume,
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
    Case(
        "stage 2 no heads in the middle block",
        [*DM, "--attention_levels", "[true,false]", "--num_head_channels", "[4,0]", "--ckpt_dir", "{ws}/new"],
        r"num_head_channels: \[4, 0\] has 0 at level 1, whose 16 .*middle block's.*use a divisor of 16 there, e.g. 16",
        "train_diffusion",
    ),
    Case(
        "stage 2 head channels not dividing the last level",
        [*DM, "--attention_levels", "[false,false]", "--num_head_channels", "[0,6]", "--ckpt_dir", "{ws}/new"],
        r"num_head_channels: \[0, 6\] has 6 at level 1, whose 16 channels it must divide",
        "train_diffusion",
    ),
    Case(
        "stage 2 no heads at a level with attention",
        [*DM, "--attention_levels", "[true,true]", "--num_head_channels", "[0,8]", "--ckpt_dir", "{ws}/new"],
        r"num_head_channels: \[0, 8\] has 0 at level 0, whose 8 channels .*\(that level has attention\)",
        "train_diffusion",
    ),
    Case(
        "stage 2 latent patch not divisible",
        [*DM, "--latent_patch_size", "[5,4,4]", "--ckpt_dir", "{ws}/new"],
        r"latent_patch_size: \[5, 4, 4\] is not divisible by 2, which the diffusion UNet's 1 downsamplings need",
        "train_diffusion",
    ),
    Case(
        "stage 2 voxel size given",
        [*DM, "--voxel_size", "[32,32,16]"],
        r"voxel_size: train_diffusion reads it from the autoencoder checkpoint \S+/autoencoder/best_model.pt, so",
        "train_diffusion",
    ),
    Case(
        "fine stage voxel size given",
        ["--voxel_size", "24", "--fast_dev_run", "true"],
        r"voxel_size: train_refiner reads it from the autoencoder checkpoint \S+/best_model.pt \(with use_recon",
        "train_refiner",
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
    Case(
        "sample clouds beyond memory",
        ["--num_points", "3000000000000", "--output_dir", "{ws}/new"],
        r"num_points: a cloud of 3000000000000 points needs about .*, but this machine has .*; at most about \d+ points",
        "inference",
    ),
    Case(
        "sample more than the disk holds",
        ["--num_samples", "7000000000000", "--num_points", "200", "--output_dir", "{ws}/new"],
        r"num_samples: writing 7000000000000 samples needs about .* on disk .*, but \S+/new has .* free; at most about",
        "inference",
    ),
    Case(
        "sample a field thinner than a voxel",
        ["--field_size_nm", "[4000,4000,10]", "--output_dir", "{ws}/new"],
        r"field_size_nm: \[4000.0, 4000.0, 10.0\] nm is less than one voxel along z; .* the smallest is \[[\d., ]+\] nm",
        "inference",
    ),
    # ---------------------------------------------------------------- the fine stage on its own (fire; exit 2)
    Case(
        "refine a grid with NaN and Inf voxels",
        [*REFINE, "--grid", "{ws}/in/grid_nan.nii.gz", "--output", "{ws}/in/p.csv"],
        r"grid_nan.nii.gz: NaN or infinite values in 2 voxels",
        setup=_grids,
    ),
    Case(
        "refine a grid with negative voxels",
        [*REFINE, "--grid", "{ws}/in/grid_negative.nii.gz", "--output", "{ws}/in/p.csv"],
        r"grid_negative.nii.gz: negative values in 3 voxels \(down to -0.2\)",
        setup=_grids,
    ),
    Case(
        "refine a grid of zeros",
        [*REFINE, "--grid", "{ws}/in/grid_zeros.nii.gz", "--output", "{ws}/in/p.csv"],
        r"grid_zeros.nii.gz: no voxel is above threshold 0 \(the largest is 0\), so there is nothing to place",
        setup=_grids,
    ),
    Case(
        "refine a cloud beyond memory",
        [*REFINE, "--grid", "{ws}/in/grid_sound.nii.gz", "--output", "{ws}/in/p.csv", "--num_points", "4000000000000"],
        r"num_points: a cloud of 4000000000000 points needs about .* but this machine has .*; at most about \d+ points",
        setup=_grids,
    ),
    # ---------------------------------------------------------------- publishing (fire; exit 2) and export (exit 1)
    Case(
        "publish from a folder of published weights",
        [*PUBLISH, "--model_dir", "{ws}/models", "--output_dir", "{ws}/pub"],
        r"models: holds published weights \(.*\), not training outputs; pass .*--model_dir outputs",
        setup=_published,
    ),
    Case(
        "publish without the fine stage over a set with one",
        [*PUBLISH, "--model_dir", "{ws}/outputs", "--output_dir", "{ws}/models", "--overwrite", "true"],
        r"refiner/best_model.pt: no such checkpoint, but the set in .*models being replaced has a fine stage",
        setup=_shipped_demo_set,
    ),
    Case(
        "publish over a set without --overwrite",
        [*PUBLISH, "--model_dir", "{ws}/outputs", "--output_dir", "{ws}/models", "--without_refiner", "true"],
        r"models: already holds published weights \(.*model.pt.*\); pass --overwrite true",
        setup=_shipped_demo_set,
    ),
    Case(
        "publish a background level without a fine stage",
        [*PUBLISH, "--model_dir", "{ws}/outputs", "--output_dir", "{ws}/pub", "--background_from", "{ws}/data"],
        r"--background_from: the background level is recorded with the fine stage, and this set publishes none",
    ),
    Case(
        "publish without_refiner is not a boolean",
        [*PUBLISH, "--model_dir", "{ws}/outputs", "--output_dir", "{ws}/pub", "--without_refiner", "perhaps"],
        r"--without_refiner: expected true or false",
    ),
    Case(
        "sample published weights without their checkpoints.json",
        ["--model_dir", "{ws}/models", "--output_dir", "{ws}/new"],
        r"models/checkpoints.json: no such file, .*; put it back, or publish your trained weights again: python",
        "inference",
        setup=_published_without_info,
    ),
    Case(
        "sample published weights beside a stray fine stage",
        ["--model_dir", "{ws}/models", "--output_dir", "{ws}/new"],
        r"checkpoints.json: has no entry for model_refiner.pt, .*; move .* away, or publish your trained weights",
        "inference",
        setup=_published_beside_a_stray_refiner,
    ),
    Case(
        "export as the README writes it before publishing",
        [*EXPORT, "--net_id", "network_def", "--filepath", "{ws}/models/model.ts", "--bundle_root", "{ws}"],
        r"network_def: .*settings of .*outputs/diffusion/best_model.pt .*; publish them first: .*--key_in_ckpt unet_ema",
        setup=_shipped_demo_set,
        status=1,
    ),
    Case(
        "export the autoencoder from the UNet's weights file",
        [*EXPORT, "--net_id", "autoencoder_def", "--model_dir", "{ws}/models", "--bundle_root", "{ws}"],
        r"autoencoder_def: .* \(Missing key\(s\) .*\); pass --ckpt_file .*models/model_autoencoder.pt",
        setup=_published,
        status=1,
    ),
    Case(
        "export into a read-only folder",
        [
            *EXPORT,
            "--net_id",
            "network_def",
            "--filepath",
            "{ws}/ro/unet.ts",
            "--bundle_root",
            "{ws}",
            "--model_dir",
            "{ws}/models",
        ],
        r"--filepath: could not write the exported file \(Read-only file system\)",
        setup=lambda ws: (_shipped_demo_set(ws), _read_only(ws, "ro")),
        status=1,
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
        "evaluate a reference of another box",
        ["--reference_file", "{ws}/in/ref_3um.h5", "--output_dir", "{ws}/new"],
        r"ref_3um.h5: its clouds span .* but the training clouds of .*voxels_nifti span .*reference_box_tolerance 0.1",
        "evaluate",
        setup=_degenerate_clouds,
    ),
    Case(
        "evaluate a reference of one point",
        ["--reference_file", "{ws}/in/ref_one.csv", "--output_dir", "{ws}/new"],
        r"ref_one.csv: cloud 0 has 1 distinct point \(1 in all\); each reference cloud needs at least 2",
        "evaluate",
        setup=_degenerate_clouds,
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


# ------------------------------------------------------------------------------------------------ a full disk


def _small_disk(path, size):
    """A tmpfs of ``size`` bytes at ``path``: a full disk in miniature (root only; skipped elsewhere)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "none", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here ({mounted.stderr.decode().strip()})")


def _error_line(result, status):
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == status, result.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def test_checkpoint_save_onto_a_full_disk_keeps_the_previous_checkpoints(workspace, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    names = ("best_model.pt", "latest_checkpoint.pt")
    held = {name: (ws / "outputs" / "autoencoder" / name).read_bytes() for name in names}
    ckpt_dir = tmp_path / "full"
    _small_disk(ckpt_dir, sum(map(len, held.values())) + len(held["best_model.pt"]) // 2)  # half a checkpoint free
    try:
        for name, data in held.items():
            (ckpt_dir / name).write_bytes(data)
        resume = ["--resume_from", str(ckpt_dir / "latest_checkpoint.pt"), "--n_epochs", "2"]
        argv = [*AE, "--ckpt_dir", str(ckpt_dir), "--log_dir", str(tmp_path / "logs"), *resume]
        command = Case("full disk", argv, "", "train_autoencoder").command(ws)
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TQDM_DISABLE="1")
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        after = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}
    finally:
        _unmount_all(tmp_path)
    error = _error_line(result, 1)
    path = re.escape(str(ckpt_dir))
    message = r"(best_model|latest_checkpoint)\.pt: could not write \(No space left on device\); any previous file"
    assert re.fullmatch(rf"error: {path}/{message} there is unchanged", error), error
    assert after == held  # both earlier checkpoints as they were, no temporary file left


def test_publishing_onto_a_full_disk_keeps_the_earlier_set(workspace, tmp_path):
    earlier = {p.name: p.read_bytes() for p in (ROOT / "models").iterdir() if p.is_file()}  # with a fine stage
    autoencoder = torch.load(workspace / "outputs" / "autoencoder" / "best_model.pt", weights_only=True)
    weights = sum(t.numel() * t.element_size() for t in autoencoder["autoencoder"].values())
    room = weights + (64 << 10)  # the new autoencoder's weights fit, the UNet's do not
    out = tmp_path / "models"
    _small_disk(out, sum(map(len, earlier.values())) + room)
    try:
        for name, data in earlier.items():
            (out / name).write_bytes(data)
        flags = ["--output_dir", str(out), "--overwrite", "true", "--without_refiner", "true"]
        command = [*PUBLISH, "--model_dir", str(workspace / "outputs"), *flags]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        after = {p.name: p.read_bytes() for p in out.iterdir()}
    finally:
        _unmount_all(tmp_path)
    error = _error_line(result, 2)
    expected = f"error: {out}: could not write the published set (No space left on device); the earlier set there"
    assert error == f"{expected} is unchanged", error
    assert after == earlier  # every file of the earlier set as it was, no staging folder, no manifest


# ------------------------------------------------------------------------------------------------ one folder, one run

HOLD = (
    "import sys; from scripts.runtime.output_folders import hold_folder; hold_folder(sys.argv[1]); "
    "print('locked', flush=True); input()"
)
IN_USE = r"in use by another run \(pid {pid}: python -c .*\); wait for it to finish or choose another --{name}"
HELD_RUNS = {  # a run and the folder it writes, with --overwrite true: another run holding it is the only obstacle
    "sample": (
        Case("sample", ["--num_samples", "2", "--num_inference_steps", "2", "--overwrite", "true"], "", "inference"),
        "outputs/samples",
    ),
    "convert": (
        Case(
            "convert",
            [*CONVERT, "--h5_file", "{ws}/in/mt.h5", "--output_dir", "{ws}/data/voxels_nifti", "--overwrite", "true"],
            "",
        ),
        "data/voxels_nifti",
    ),
    "stage 1": (Case("stage 1", [*AE, "--overwrite", "true"], "", "train_autoencoder"), "outputs/autoencoder"),
}


@pytest.mark.parametrize("name", HELD_RUNS)
def test_a_folder_another_run_holds_is_refused_until_that_run_is_gone(name, workspace, tmp_path):
    from conftest import started, wait_for_line

    case, folder = HELD_RUNS[name]
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    folder = ws / folder
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TQDM_DISABLE="1")
    hold = [sys.executable, "-c", HOLD, str(folder)]
    with started(hold, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        wait_for_line(holder, "locked")
        before = snapshot(ws)
        refused = subprocess.run(case.command(ws), cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert snapshot(ws) == before  # nothing written, the holder's lock file left alone
        holder.kill()
    error = _error_line(refused, case.expected_status())
    name = "ckpt_dir" if case.config == "train_autoencoder" else "output_dir"
    assert re.fullmatch(rf"error: {re.escape(str(folder))}: {IN_USE.format(pid=holder.pid, name=name)}", error)
    after = subprocess.run(case.command(ws), cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert after.returncode == 0, after.stderr[-3000:]
    assert not (folder / ".lock").exists()  # the killed holder's lock file was taken over and removed


def test_a_training_run_holds_its_ckpt_dir_until_it_ends(dataset_dir, tmp_path):
    import json

    from conftest import overrides, started, wait_for_line

    overlay = tmp_path / "pause.json"
    pause = "$@hooks.pause_after(@train#trainer, @pause_at)"
    hooks = "$__import__('tests.bundle_hooks').bundle_hooks"
    overlay.write_text(json.dumps({"hooks": hooks, "pause_at": 1, "run": [pause, "$@train#trainer.run()"]}))
    ckpt_dir = tmp_path / "outputs" / "autoencoder"

    def command(*overlays, **extra):
        configs = str(["configs/train_autoencoder.json", *overlays])
        run = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs]
        return [*run, *_flags(overrides(dataset_dir, tmp_path, **extra))]

    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    with started(command(str(overlay)), cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) as first:
        wait_for_line(first, "paused at iteration")
        before = snapshot(tmp_path / "outputs")
        second = subprocess.run(command(), cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert snapshot(tmp_path / "outputs") == before
        first.kill()
    error = _error_line(second, 1)
    message = IN_USE.format(pid=first.pid, name="ckpt_dir").replace("python -c", "python -m monai.bundle run")
    assert re.fullmatch(rf"error: {re.escape(str(ckpt_dir))}: {message}", error), error
    third = subprocess.run(command(overwrite=True), cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert third.returncode == 0, third.stderr[-3000:]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best_model.pt", "latest_checkpoint.pt"]


def test_a_staged_output_is_held_while_written_and_not_refused_by_its_own_process(tmp_path):
    from scripts.runtime.errors import UserError
    from scripts.runtime.output_folders import StagedOutput

    out = tmp_path / "new" / "out"
    try_hold = [
        sys.executable,
        "-c",
        "import sys; from scripts.runtime.output_folders import hold_folder; hold_folder(sys.argv[1])",
    ]
    staged = StagedOutput(out, "files", ["*.txt"])
    assert staged.check() == [] and not (tmp_path / "new").exists()  # a check creates nothing
    with staged as folder:
        assert staged.check() == []  # the same process checks again: not refused
        (folder / "a.txt").write_text("a")
        other = subprocess.run([*try_hold, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert other.returncode == 1 and f"{out}: in use by another run (pid {os.getpid()}: " in other.stderr
    assert sorted(p.name for p in out.iterdir()) == [".manifest.json", "a.txt"]  # the lock file removed
    with pytest.raises(UserError, match="already holds files"):  # refused for another reason: no lock file left
        StagedOutput(out, "files", ["*.txt"]).check()
    with pytest.raises(KeyboardInterrupt):
        with StagedOutput(tmp_path / "gone" / "out", "files", ["*.txt"]) as folder:
            (folder / "b.txt").write_text("b")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]  # the folders it created removed again
    assert sorted(p.name for p in out.iterdir()) == [".manifest.json", "a.txt"]


def _unreadable(item):
    from scripts.runtime.errors import UserError

    raise UserError(f"{item}: not a readable NIfTI volume")


def test_a_user_error_in_a_data_loader_worker_is_one_line(capsys):
    """torch re-raises a worker's exception as the worker's outermost type (MONAI's transform ``RuntimeError``),
    with the worker's traceback as its text; the excepthook finds the UserError's line in it."""
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, Lambda
    from scripts.runtime.errors import _one_line_excepthook

    loader = DataLoader(Dataset(["in/a.nii.gz"], transform=Compose([Lambda(_unreadable)])), num_workers=2)
    with pytest.raises(RuntimeError, match="DataLoader worker") as caught:
        next(iter(loader))
    _one_line_excepthook(caught.type, caught.value, caught.tb)
    assert capsys.readouterr().err == "error: in/a.nii.gz: not a readable NIfTI volume\n"
