"""Checkpoints as plain dicts: saved atomically, loaded with ``weights_only=True`` only, refused with one line."""

import hashlib
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from scripts.atomic import atomic_path
from scripts.errors import UserError

FORMAT_VERSION = 1


def save_checkpoint(path, payload):
    """Write ``payload`` (a dict of tensors, numbers, strings, lists and dicts) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a full disk or a kill leaves the previous file at ``path`` untouched
        torch.save(dict(payload, format_version=FORMAT_VERSION), tmp)
    return path


def load_checkpoint(path, stage=None, hint=""):
    """Load a checkpoint written by :func:`save_checkpoint` without running any pickled code.

    Args:
        path: the checkpoint file.
        stage: the expected ``stage`` entry ('autoencoder' or 'diffusion'), checked when given.
        hint: what to do when the file is missing (e.g. 'train stage 1 first').
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint" + (f"; {hint}" if hint else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused, it holds objects that are not plain weights ({_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(f"{path}: not a readable checkpoint, truncated or corrupt ({_first_line(e)})") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise UserError(f"{path}: not a checkpoint of this bundle (no format_version entry)")
    if stage is not None and ckpt.get("stage") != stage:
        raise UserError(f"{path}: is a {ckpt.get('stage')!r} checkpoint, expected {stage!r}")
    return ckpt


def _first_line(e):
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__


def file_sha256(path):
    """Hex SHA-256 of a file (the hashes in ``large_files.yml``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(state_dict):
    """Hex SHA-256 of a network's weights (names, shapes, values): ties a stage-2 checkpoint to the autoencoder
    it was trained on, whichever file those weights are copied into."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


SAMPLING_KEYS = (
    "stage",
    "epoch",
    "network_config",
    "dataset_info",
    "voxel_size",
    "latent_shape",
    "scheduler",
    "scale_factor",
    "autoencoder_weights_sha256",
    "best_metric",
    "key_metric_name",
    "autoencoder",
    "unet",
    "unet_ema",
    "refiner",
    "coupling",
    "sampling",
)


def check_resume(resume_from, stage, expected):
    """Refuse, at start-up, to resume from a checkpoint whose settings differ from this run's.

    Args:
        resume_from: the checkpoint to resume from, or ``None`` (nothing to check).
        stage: its expected stage.
        expected: ``{entry: value}`` this run uses, compared with the checkpoint's entries (network settings, grid
            size, data geometry, ...); ``dataset_info`` is compared by its geometry (the box and grid).
    """
    if not resume_from:
        return None
    ckpt = load_checkpoint(resume_from, stage, hint="check --resume_from")
    for key, value in expected.items():
        stored, wanted = ckpt.get(key), value
        if key == "dataset_info":
            stored, wanted = (stored or {}).get("geometry"), (value or {}).get("geometry")
        if _plain(stored) != _plain(wanted):
            raise UserError(
                f"{resume_from}: was trained with {key} {_plain(stored)}, but this run has {_plain(wanted)}; resume "
                "with the settings it was trained with, or train afresh into another ckpt_dir"
            )
    return ckpt


def _plain(value):
    """Tuples as lists, so settings from a config and from a checkpoint compare equal (1 == 1.0 already)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def slim_checkpoint(src, dst):
    """Copy what sampling needs from a best_model.pt (no optimizer, discriminator or RNG state) to ``dst``."""
    ckpt = load_checkpoint(src)
    return save_checkpoint(dst, {k: v for k, v in ckpt.items() if k in SAMPLING_KEYS})


def load_state(module, state, path, name):
    """``module.load_state_dict(state)`` with a one-line error naming the file when the shapes do not match."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(
            f"{path}: the {name} weights do not fit the network built from the config ({_first_line(e)})"
        ) from None


def rng_state():
    """The states of every random generator a training run draws from, as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore the generators saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
