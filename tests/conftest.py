"""Shared fixtures: a tiny converted dataset and helpers that run bundle configs with tiny networks on CPU."""

import os
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from benchmarks.common import TINY_AUTOENCODER as TINY_AUTOENCODER_NETWORK
from benchmarks.common import TINY_REFINER, TINY_UNET  # noqa: F401 (TINY_REFINER: for the tests)

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]

# Stage 1 small enough for seconds on a CPU: 16³ grids, one downsampling (8³ latents), a 2-layer discriminator.
TINY_AUTOENCODER = {
    "voxel_size": 16,
    **TINY_AUTOENCODER_NETWORK,
    "batch_size": 2,
    "num_workers": 0,
    "cache_rate": 1.0,
    "fast_dev_run": True,
    "fast_dev_run_batches": 2,
    "n_epochs": 1,
    "image_log_interval": 1,
}


@pytest.fixture(scope="session")
def picasso_file(tmp_path_factory):
    """The real Picasso HDF5 with its ``.yaml`` beside it. The yaml is kept in tests/data as ``.yaml.txt``: it holds
    several YAML documents, which the Model Zoo's check-yaml hook refuses in a bundle."""
    folder = tmp_path_factory.mktemp("picasso")
    data = ROOT / "tests" / "data"
    shutil.copy(data / "picasso_egfr_mols_real2d.hdf5", folder / "picasso_egfr_mols_real2d.hdf5")
    shutil.copy(data / "picasso_egfr_mols_real2d.yaml.txt", folder / "picasso_egfr_mols_real2d.yaml")
    return folder / "picasso_egfr_mols_real2d.hdf5"


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory):
    """Eight simulated microtubule clouds converted to 16³ grids (6 train, 2 val)."""
    from scripts.convert_h5_to_nifti import convert
    from scripts.data.pointclouds import write_point_clouds_h5
    from scripts.simulate_smlm import simulate_microtubules

    root = tmp_path_factory.mktemp("data")
    write_point_clouds_h5(root / "mt.h5", simulate_microtubules(8, seed=1, mean_points=3000))
    convert(root / "mt.h5", root / "voxels", voxel_size=16, sigma=1.0, train_ratio=0.75, seed=0)
    return root / "voxels"


def overrides(dataset_dir, out_dir, **extra):
    """Config overrides that point a stage-1 run at ``dataset_dir`` and write into ``out_dir``."""
    return {
        **TINY_AUTOENCODER,
        "dataset_dir": str(dataset_dir),
        "ckpt_dir": str(out_dir / "outputs" / "autoencoder"),
        "log_dir": str(out_dir / "logs" / "autoencoder"),
        **extra,
    }


def initialized_workflow(config, **override):
    """A bundle config's workflow in this process, initialized (its ``initialize`` run) but not run."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(ROOT / "configs" / config),
        meta_file=str(ROOT / "configs" / "metadata.json"),
        logging_file=str(ROOT / "configs" / "logging.conf"),
        workflow_type="train",
        **override,
    )
    workflow.initialize()
    return workflow


def run_workflow(config, **override):
    """Run a bundle config in this process and return the workflow (its parsed objects can be inspected)."""
    workflow = initialized_workflow(config, **override)
    try:
        workflow.run()
    finally:
        workflow.finalize()
    return workflow


def run_cli(config, **override):
    """``python -m monai.bundle run --config_file configs/<config> --key value ...`` from the bundle root."""
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"configs/{config}"]
    for key, value in override.items():
        args += [f"--{key}", str(value).replace("'", '"') if isinstance(value, list) else str(value)]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def write_h5(path, **datasets):
    """Write each keyword array as an HDF5 dataset of that name; returns ``path``."""
    import h5py

    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f[key] = value
    return path


def user_error(exc):
    """The :class:`scripts.runtime.errors.UserError` behind ``exc`` (frameworks wrap exceptions), or ``None``."""
    from scripts.runtime.errors import UserError

    while exc is not None and not isinstance(exc, UserError):
        exc = exc.__cause__ or exc.__context__
    return exc


TINY_DIFFUSION = {
    **TINY_UNET,
    "num_train_timesteps": 100,
    "batch_size": 2,
    "fast_dev_run": True,
    "fast_dev_run_batches": 2,
    "n_epochs": 1,
    "scale_factor_batches": 2,
    "generate_samples_interval": 1,
    "num_monitor_samples": 1,
    "num_inference_steps": 3,
}


@pytest.fixture(scope="session")
def autoencoder_ckpt(dataset_dir, tmp_path_factory):
    """A stage-1 checkpoint of the tiny autoencoder, trained for one fast epoch."""
    out = tmp_path_factory.mktemp("stage1")
    run_workflow("train_autoencoder.json", **overrides(dataset_dir, out))
    return out / "outputs" / "autoencoder" / "best_model.pt"


def diffusion_overrides(dataset_dir, autoencoder_ckpt, out_dir, **extra):
    """Config overrides for a tiny stage-2 run on the tiny stage-1 checkpoint, writing into ``out_dir``."""
    return {
        **TINY_DIFFUSION,
        "dataset_dir": str(dataset_dir),
        "autoencoder_path": str(autoencoder_ckpt),
        "ckpt_dir": str(out_dir / "outputs" / "diffusion"),
        "log_dir": str(out_dir / "logs" / "diffusion"),
        **extra,
    }


@pytest.fixture(scope="session")
def model_dir(dataset_dir, autoencoder_ckpt, tmp_path_factory):
    """``<dir>/autoencoder/best_model.pt`` and ``<dir>/diffusion/best_model.pt`` of the tiny stage 1 and 2."""
    out = tmp_path_factory.mktemp("stage2")
    run_workflow(
        "train_diffusion.json", **diffusion_overrides(dataset_dir, autoencoder_ckpt, out, generate_samples_interval=5)
    )
    models = out / "models"
    (models / "autoencoder").mkdir(parents=True)
    (models / "autoencoder" / "best_model.pt").write_bytes(autoencoder_ckpt.read_bytes())
    (models / "diffusion").mkdir()
    (models / "diffusion" / "best_model.pt").write_bytes((out / "outputs" / "diffusion" / "best_model.pt").read_bytes())
    return models


# a limit for waiting on an event (a file appearing, a line printed), generous for a busy machine: it is reached only
# when the event never comes
EVENT_LIMIT_S = 600


def _default_signals():
    # a job started in the background by a non-interactive shell (as CI runs may be) ignores SIGINT, and so would the
    # runs it starts (Python keeps an ignored SIGINT ignored): a test that sends one must first undo that
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def started(args, **kwargs):
    """``subprocess.Popen(args, **kwargs)`` with SIGINT and SIGTERM at their defaults, killed when the block ends."""
    child = subprocess.Popen(args, preexec_fn=_default_signals, **kwargs)
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def wait_for_line(child, prefix, limit=EVENT_LIMIT_S):
    """Read ``child``'s stdout until a line starts with ``prefix``; fail when it ends first or ``limit`` s pass."""
    found = threading.Event()

    def read():
        for line in child.stdout:
            if line.startswith(prefix):
                found.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(limit)
    assert found.is_set(), f"no line {prefix!r} within {limit} s (exit status {child.poll()})"
