"""Training data: the converter's NIfTI folders, checked up front, and the geometry they were made with."""

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import RandomizableTrait
from scripts.data.geometry import GridGeometry
from scripts.runtime.errors import UserError

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
    from monai.transforms import Compose, EnsureTyped

    return Compose(
        [
            LoadVolumed(),
            resize_transform(spatial_size),
            EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        ]
    )


def resize_transform(spatial_size):
    """The resize every stage applies to ``data["image"]`` (C, X, Y, Z): trilinear, anti-aliased when shrinking."""
    from monai.transforms import Resized

    return Resized(keys="image", spatial_size=tuple(spatial_size), mode="trilinear", anti_aliasing=True)


def resize_grid(grid, spatial_size):
    """A grid (X, Y, Z) made in memory, resized as the volumes of :func:`volume_transforms` are (float32 array)."""
    image = torch.as_tensor(np.asarray(grid, np.float32))[None]
    resized = resize_transform(spatial_size)({"image": image})["image"]
    return np.asarray(resized.as_tensor() if hasattr(resized, "as_tensor") else resized, np.float32)[0]


class FlipRotate:
    """One element of the symmetry group the physics allows: flips of x, y (and z when asked) and, where x and y
    are interchangeable (same size and spacing), a swap of x and y, which with the flips makes every 90° rotation
    about z. z flips are off by default: axial precision is not symmetric in real data.

    Applied to a grid (…, X, Y, Z) and to points in continuous voxel coordinates of that grid.
    """

    def __init__(self, swap_xy=False, flip=(False, False, False)):
        self.swap_xy, self.flip = bool(swap_xy), tuple(bool(f) for f in flip)

    def grid(self, grid):
        out = grid.swapaxes(-3, -2) if self.swap_xy else grid
        for axis, f in enumerate(self.flip):
            if f:
                out = out.flip(axis - 3) if torch.is_tensor(out) else np.flip(out, axis - 3)
        return out.contiguous() if torch.is_tensor(out) else np.ascontiguousarray(out)

    def points(self, points, shape):
        """``shape``: the grid's (X, Y, Z) before the transform."""
        out = points[:, [1, 0, 2]] if self.swap_xy else points.clone() if torch.is_tensor(points) else points.copy()
        size = np.asarray(shape, np.float64)[[1, 0, 2] if self.swap_xy else [0, 1, 2]]
        for axis, f in enumerate(self.flip):
            if f:
                out[:, axis] = size[axis] - out[:, axis]
        return out


def symmetries(shape, spacing_nm, flip_x=True, flip_y=True, rotate_z=True, flip_z=False):
    """Every :class:`FlipRotate` the settings allow for a grid of ``shape`` and ``spacing_nm`` (x/y swaps only
    where both agree), identity first."""
    square = shape[0] == shape[1] and np.isclose(spacing_nm[0], spacing_nm[1], rtol=1e-3)
    swaps = (False, True) if rotate_z and square else (False,)
    options = [(False, True) if on else (False,) for on in (flip_x, flip_y, flip_z)]
    return [FlipRotate(s, (fx, fy, fz)) for s in swaps for fx in options[0] for fy in options[1] for fz in options[2]]


class RandFlipRotated(RandomizableTrait):
    """A random one of :func:`symmetries` applied to the grids ``data["image"]`` and ``data["recon"]`` (C, X, Y, Z)
    and to ``data["points"]`` in voxel coordinates, those present; MONAI's CacheDataset caches what comes before
    it, not it.

    The draw comes from torch's generator, which checkpoints save and restore, so a resumed run augments exactly as
    an uninterrupted one.
    """

    def __init__(self, shape, spacing_nm, flip_x=True, flip_y=True, rotate_z=True, flip_z=False):
        self.shape = tuple(shape)
        self.elements = symmetries(shape, spacing_nm, flip_x, flip_y, rotate_z, flip_z)

    def __call__(self, data):
        element = self.elements[int(torch.randint(len(self.elements), ()))]
        out = dict(data)
        for key in ("image", "recon"):
            if key in data:
                out[key] = element.grid(data[key])
        if "points" in data:
            out["points"] = element.points(data["points"], self.shape)
        return out


class RandPatchd(RandomizableTrait):
    """One random window of ``patch_size`` (X, Y, Z) of the grids ``data[k]`` (C, X, Y, Z) for ``k`` in ``keys``,
    the same window for each (MONAI's ``RandSpatialCropd``); ``patch_size`` ``None`` leaves them whole.

    The window is drawn from torch's generator, as :class:`RandFlipRotated`, so a resumed run crops as an
    uninterrupted one.
    """

    def __init__(self, keys, patch_size=None):
        from monai.transforms import RandSpatialCropd

        self.keys = [keys] if isinstance(keys, str) else list(keys)
        self.crop = None if patch_size is None else RandSpatialCropd(self.keys, tuple(patch_size), random_size=False)

    def __call__(self, data):
        if self.crop is None:
            return data
        self.crop.set_random_state(seed=int(torch.randint(2**31, ())))
        out = self.crop(data)
        return {k: out[k].as_tensor() if k in self.keys and hasattr(out[k], "as_tensor") else out[k] for k in out}


def cloud_items(datalist, points_file, transform, geometry, autoencoder=None, device="cpu", batch_size=2):
    """The fine stage's items: each volume of ``datalist`` (loaded by ``transform``) with its cloud from
    ``points_file`` (the converter's ``train_points.h5`` / ``val_points.h5``, in the same order) in continuous voxel
    coordinates of the loaded grid, and, given ``autoencoder``, the grid's reconstruction ``recon``."""
    from scripts.data.pointclouds import read_point_clouds

    clouds, _ = read_point_clouds(points_file)
    if len(clouds) != len(datalist):
        raise UserError(
            f"{points_file}: holds {len(clouds)} clouds for {len(datalist)} volumes in "
            f"{Path(datalist[0]['image']).parent}; convert again"
        )
    items = []
    for entry, cloud in zip(datalist, clouds):
        image = transform(dict(entry))["image"]
        grid_geometry = geometry.with_shape(image.shape[1:])
        inside = cloud[grid_geometry.inside(cloud)]
        items.append({"image": image, "points": torch.from_numpy(grid_geometry.to_voxel(inside))})
    if autoencoder is not None:
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                images = torch.stack([it["image"] for it in chunk]).to(device)
                for it, recon in zip(chunk, autoencoder.reconstruct(images).float().clamp(0, 1).cpu()):
                    it["recon"] = recon
    return items


class SubsamplePoints:
    """``data["points"]`` replaced by ``num_points`` of its rows drawn at random (with replacement), so batches
    stack; torch's generator, as :class:`RandFlipRotated`."""

    def __init__(self, num_points):
        self.num_points = int(num_points)

    def __call__(self, data):
        points = data["points"]
        return {**data, "points": points[torch.randint(len(points), (self.num_points,))]}


def grid_geometry(dataset_info, shape):
    """The data's box on a grid of ``shape`` (what a volume resized to ``shape`` covers)."""
    return GridGeometry.from_dict(dataset_info["geometry"]).with_shape(tuple(shape))
