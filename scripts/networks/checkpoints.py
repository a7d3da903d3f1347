"""Checkpoints as plain dicts: saved atomically, loaded with ``weights_only=True`` only, refused with one line.

Two layouts hold them:

- training (``outputs/<stage>/best_model.pt``): one dict per stage with its weights, settings, optimizer and RNG
  state, so training resumes from it;
- shipped (``models/``, the MONAI Model Zoo's): ``model.pt`` (the diffusion UNet, the zoo's main network),
  ``model_autoencoder.pt`` and ``model_refiner.pt`` are plain state dicts, and ``checkpoints.json`` holds what
  sampling needs besides weights (network settings, data geometry, scale factor, noise schedule) and each file's
  SHA-256. :func:`load_checkpoint` reads either as the same dict.
"""

import hashlib
import json
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch
from scripts.runtime.atomic_write import atomic_path
from scripts.runtime.errors import UserError

FORMAT_VERSION = 1
SHIPPED_FILES = {"diffusion": "model.pt", "autoencoder": "model_autoencoder.pt", "refiner": "model_refiner.pt"}
SHIPPED_INFO = "checkpoints.json"
WEIGHTS = {"diffusion": "unet", "autoencoder": "autoencoder", "refiner": "refiner"}
# settings recorded in checkpoints only since they became settings: what a checkpoint without them was trained with
RECORDED_SINCE = {"latent_draw": "sample"}
# what travels beside the weights in checkpoints.json (no optimizer, discriminator or RNG state)
SHIPPED_KEYS = (
    "stage",
    "epoch",
    "network_config",
    "dataset_info",
    "voxel_size",
    "patch_size",
    "latent_shape",
    "scheduler",
    "scale_factor",
    "latent_draw",
    "autoencoder_weights_sha256",
    "best_metric",
    "key_metric_name",
    "coupling",
    "sampling",
)


def save_checkpoint(path, payload):
    """Write ``payload`` (a dict of tensors, numbers, strings, lists and dicts) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(dict(payload, format_version=FORMAT_VERSION), path)
    return path


def _save(obj, path):
    """``torch.save`` to ``path`` atomically: a kill or a failure leaves the previous file untouched, and a full disk
    is the ``OSError`` (ENOSPC) that :func:`scripts.runtime.atomic_write.atomic_path` reports as one line naming ``path``.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        _torch_save(obj, f)


def _torch_save(obj, f):
    """``torch.save`` into the open file ``f``, raising the ``OSError`` of a failed write (a full disk) as it is:
    torch reports it as an ``enforce fail ... unexpected pos`` RuntimeError (given a path, without the OSError)."""
    try:
        torch.save(obj, f)
    except RuntimeError as e:
        if isinstance(e.__context__, OSError):  # our file's write failed inside torch's writer
            raise e.__context__ from None
        raise


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
    if isinstance(ckpt, dict) and "format_version" not in ckpt and path.name in SHIPPED_FILES.values():
        ckpt = _shipped_checkpoint(path, ckpt)
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise UserError(f"{path}: not a checkpoint of this bundle (no format_version entry)")
    if stage is not None and ckpt.get("stage") != stage:
        raise UserError(f"{path}: is a {ckpt.get('stage')!r} checkpoint, expected {stage!r}")
    return ckpt


def _shipped_checkpoint(path, state):
    """A plain state dict of the shipped layout with its entry of ``checkpoints.json``, as one checkpoint dict."""
    info_path = path.parent / SHIPPED_INFO
    if not info_path.is_file():
        raise UserError(
            f"{info_path}: no such file, and it holds the settings {path.name} needs; put it back, or "
            + republish_hint(path.parent)
        )
    try:
        info = json.loads(info_path.read_text())[path.name]
    except (ValueError, KeyError, TypeError):
        raise UserError(
            f"{info_path}: has no entry for {path.name}, so that file is not part of the published set; move "
            f"{path} away, or " + republish_hint(path.parent)
        ) from None
    if file_sha256(path) != info.get("sha256"):
        raise UserError(
            f"{path}: its SHA-256 differs from the one in {info_path} (changed after publishing); put the published "
            "file back, or " + republish_hint(path.parent)
        )
    return dict(info["checkpoint"], **{WEIGHTS[info["checkpoint"]["stage"]]: state}, format_version=FORMAT_VERSION)


def republish_hint(models_dir):
    """What to do when a shipped set is inconsistent; never 're-download the bundle', which would replace the
    user's published weights with the demo's."""
    command = f"python scripts/weights.py --model_dir outputs --output_dir {models_dir} --overwrite true"
    return f"publish your trained weights again: {command}"


def ship_checkpoint(ckpt, models_dir):
    """Write ``ckpt``'s sampling weights as a plain state dict in ``models_dir`` (the shipped layout; publishing
    stages the set and swaps it in, so the write is not atomic itself and a full disk raises ``OSError``) and return
    its ``checkpoints.json`` entry; the diffusion UNet ships its moving average of weights where it has one."""
    stage = ckpt["stage"]
    key = "unet_ema" if stage == "diffusion" and "unet_ema" in ckpt else WEIGHTS[stage]
    path = Path(models_dir) / SHIPPED_FILES[stage]
    with open(path, "wb") as f:
        _torch_save(dict(ckpt[key]), f)
    entry = {k: _plain(ckpt[k]) for k in SHIPPED_KEYS if k in ckpt}
    if "dataset_info" in entry:  # the training files' list and where the data lie stay with the user: names only
        info = {k: v for k, v in entry["dataset_info"].items() if k != "files"}
        if isinstance(info.get("source", {}).get("file"), str):
            info["source"] = dict(info["source"], file=Path(info["source"]["file"]).name)
        entry["dataset_info"] = info
    return path, {"sha256": file_sha256(path), "checkpoint": entry}


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
        stored, wanted = ckpt.get(key, RECORDED_SINCE.get(key)), value
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


def load_state(module, state, path, name):
    """``module.load_state_dict(state)`` with a one-line error naming the file when the shapes do not match."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(
            f"{path}: the {name} weights do not fit the network built from the config ({state_dict_problem(e)})"
        ) from None


def state_dict_problem(error):
    """The problem ``load_state_dict`` reports, short: a size mismatch if there is one, else the first missing or
    unexpected key and how many there are (its first line only says 'Error(s) in loading state_dict')."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    if not lines:
        return _first_line(error)
    line = next((line for line in lines if line.startswith("size mismatch")), lines[0])
    head, _, keys = line.partition(": ")
    keys = keys.rstrip(".").split(", ")
    if not line.startswith("size mismatch") and len(keys) > 1:
        return f"{head}: {keys[0]} and {len(keys) - 1} more"
    return line[:300]


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
