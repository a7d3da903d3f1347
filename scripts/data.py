"""Training data: the converter's NIfTI folders, checked up front, and the geometry they were made with."""

import json
import logging
from pathlib import Path

import nibabel as nib
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
        if not box.same_box(first[1]):
            raise UserError(
                f"{path}: covers the box {box.describe()} but {first[0].name} covers {first[1].describe()}; volumes "
                "of different conversions cannot be mixed (grid sizes may differ, the box may not)"
            )
    return [{"image": str(p)} for p in files]


def volume_box(datalist):
    """The box of a datalist's volumes (:func:`list_volumes` checked that they share one)."""
    img = nib.load(datalist[0]["image"])
    return GridGeometry.from_affine(img.affine, img.shape[:3])


def check_same_box(train_datalist, val_datalist, trained_on=None, trained_on_path=None):
    """Start-up check: training and validation volumes cover one box, and with ``trained_on`` (the geometry dict
    of the autoencoder checkpoint at ``trained_on_path``) the box the autoencoder was trained on."""
    train, val = volume_box(train_datalist), volume_box(val_datalist)
    if not train.same_box(val):
        raise UserError(
            f"{val_datalist[0]['image']}: covers the box {val.describe()}, but the training volumes cover "
            f"{train.describe()}; train and validate on one conversion"
        )
    if trained_on is not None and not train.same_box(GridGeometry.from_dict(trained_on)):
        raise UserError(
            f"{train_datalist[0]['image']}: covers the box {train.describe()}, but the autoencoder {trained_on_path} "
            f"was trained on {GridGeometry.from_dict(trained_on).describe()}; its samples would land in that box. "
            "Train stage 2 on the autoencoder's conversion, or retrain stage 1 on this one"
        )
    return train


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


class LoadVolumed:
    """``LoadImaged`` of the ``image`` key, channel first, with a one-line error naming a file it cannot read
    (truncated, not NIfTI) instead of a traceback from inside a data loader."""

    def __init__(self):
        from monai.transforms import LoadImaged

        self.load = LoadImaged(keys="image", ensure_channel_first=True, image_only=True)

    def __call__(self, data):
        try:
            return self.load(data)
        except Exception as e:  # nibabel and gzip raise many types for a bad file
            while e.__cause__ is not None:
                e = e.__cause__
            raise UserError(f"{data['image']}: not a readable NIfTI volume ({e.__class__.__name__}: {e})") from None


def volume_transforms(spatial_size):
    """Load a NIfTI volume channel-first as float32 and resize it to ``spatial_size`` (anti-aliased when shrinking).

    Both training stages and the evaluation use this, so the autoencoder always sees the same preprocessing.
    """
    from monai.transforms import Compose, EnsureTyped, Resized

    return Compose(
        [
            LoadVolumed(),
            Resized(keys="image", spatial_size=tuple(spatial_size), mode="trilinear", anti_aliasing=True),
            EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        ]
    )
