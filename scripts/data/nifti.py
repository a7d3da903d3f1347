"""NIfTI volumes that carry their geometry: the affine maps voxel index to voxel centre in micrometres."""

from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip
from scripts.data.geometry import GridGeometry
from scripts.runtime.atomic_write import atomic_path
from scripts.runtime.errors import UserError

# isal's level 1 writes standard gzip about 8x faster than zlib's level 1 at the same size (see benchmarks).
GZIP_LEVEL = 1


def save_nifti(path, grid, geometry):
    """Write a float32 (X, Y, Z) grid with ``geometry`` in its affine (µm), atomically; ``.nii.gz`` is gzipped."""
    path = Path(path)
    img = nib.Nifti1Image(np.asarray(grid, dtype=np.float32), geometry.affine())
    img.header.set_xyzt_units(xyz="micron")
    img.header["descrip"] = b"point-cloud density grid"
    with atomic_path(path) as tmp:
        if path.name.endswith(".gz"):
            with igzip.open(tmp, "wb", compresslevel=GZIP_LEVEL) as f:
                img.to_stream(f)
        else:
            with open(tmp, "wb") as f:
                img.to_stream(f)
    return path


def load_nifti(path):
    """Read a 3D volume as ``(float32 array (X, Y, Z), GridGeometry)``; a non-volume file gets a clear error."""
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # nibabel raises many types for a bad file
        raise UserError(f"{path}: not a readable NIfTI volume ({e.__class__.__name__}: {e})") from None
    data = np.squeeze(data)
    if data.ndim != 3:
        raise UserError(f"{path}: expected a 3D volume, got shape {img.shape}")
    return data, GridGeometry.from_affine(img.affine, data.shape)
