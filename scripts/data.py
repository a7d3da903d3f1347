"""Training data: the converter's NIfTI folders, checked up front, and the geometry they were made with."""

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from scripts.errors import UserError
from scripts.geometry import GridGeometry

logger = logging.getLogger(__name__)

SUFFIXES = (".nii", ".nii.gz")


def list_volumes(data_dir, name="data folder"):
    """``[{"image": path}, ...]`` for every NIfTI volume in ``data_dir``, sorted; each header is checked.

    Raises a :class:`UserError` naming the folder when it is missing or empty, and naming the file when one is
    not a readable 3D (or single-channel 4D) NIfTI volume.
    """
    folder = Path(data_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such {name}; convert point clouds with scripts/convert_h5_to_nifti.py first")
    files = sorted(p for p in folder.iterdir() if p.name.endswith(SUFFIXES) and not p.name.startswith("."))
    if not files:
        raise UserError(f"{folder}: the {name} holds no .nii or .nii.gz volumes")
    first = None
    for path in files:
        try:
            img = nib.load(str(path))
        except Exception as e:  # nibabel raises many types for a bad file
            raise UserError(f"{path}: not a readable NIfTI volume ({e.__class__.__name__})") from None
        if len(img.shape) != 3 and not (len(img.shape) == 4 and img.shape[3] == 1):
            raise UserError(f"{path}: expected a 3D volume, got shape {img.shape}")
        box = GridGeometry.from_affine(img.affine, img.shape[:3])
        first = first or (path, box)
        if not np.allclose(
            [box.box_min_nm, box.box_max_nm],
            [first[1].box_min_nm, first[1].box_max_nm],
            atol=1e-3 * float(first[1].size_nm.max()),
        ):
            raise UserError(
                f"{path}: covers the box {_box(box)} nm but {first[0].name} covers {_box(first[1])} nm; volumes of "
                "different conversions cannot be mixed (grid sizes may differ, the box may not)"
            )
    return [{"image": str(p)} for p in files]


def _box(geometry):
    return f"{[round(v, 1) for v in geometry.box_min_nm]}–{[round(v, 1) for v in geometry.box_max_nm]}"


def load_dataset_info(data_dir):
    """The conversion's ``dataset_info.json`` (beside the ``train``/``val`` folders), with the geometry checked.

    Without the file (volumes from elsewhere) the geometry is taken from the first volume's affine and there is
    no points-per-mass: sampling then needs an explicit ``num_points``.
    """
    folder = Path(data_dir)
    info_path = folder.parent / "dataset_info.json"
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
            GridGeometry.from_dict(info["geometry"])
        except (json.JSONDecodeError, KeyError, TypeError, UserError) as e:
            raise UserError(f"{info_path}: not a valid dataset_info.json ({e})") from None
        return info
    first = list_volumes(folder)[0]["image"]
    img = nib.load(first)
    geometry = GridGeometry.from_affine(img.affine, img.shape[:3])
    logger.warning(f"{info_path} not found: geometry taken from {first}; no points-per-mass for sampling")
    return {"geometry": geometry.to_dict(), "points_per_mass": None, "source": {"file": None}}


def volume_transforms(spatial_size):
    """Load a NIfTI volume channel-first as float32 and resize it to ``spatial_size`` (anti-aliased when shrinking).

    Both training stages and the evaluation use this, so the autoencoder always sees the same preprocessing.
    """
    from monai.transforms import Compose, EnsureTyped, LoadImaged, Resized

    return Compose(
        [
            LoadImaged(keys="image", ensure_channel_first=True, image_only=True),
            Resized(keys="image", spatial_size=tuple(spatial_size), mode="trilinear", anti_aliasing=True),
            EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        ]
    )
