"""The geometry contract: a physical box in nanometres, a grid shape, and the maps between them.

Voxel ``i`` along an axis covers ``[min + i * spacing, min + (i + 1) * spacing)`` and its centre is
``min + (i + 0.5) * spacing``. Everything that turns points into grids or grids into points (the converter,
the dataset, the sampler, the metrics) goes through :class:`GridGeometry`, so a generated cloud lands in
the same nanometre box as the training clouds.
"""

from dataclasses import dataclass

import numpy as np
from scripts.runtime.errors import UserError


def as_shape(voxel_size, name="voxel_size"):
    """Return ``voxel_size`` (an int or a list of three ints) as a tuple of three positive ints (X, Y, Z)."""
    values = [voxel_size] * 3 if np.isscalar(voxel_size) else list(voxel_size)
    if len(values) != 3 or not all(_is_positive_int(v) for v in values):
        raise UserError(f"{name}: expected a positive integer or a list of three, got {voxel_size!r}")
    return tuple(int(v) for v in values)


def as_triple(value, name):
    """Return a number or a list of three numbers as a finite float64 array of shape (3,) (x, y, z)."""
    try:
        values = np.broadcast_to(np.asarray(value, dtype=np.float64), (3,)).copy()
    except (TypeError, ValueError):
        raise UserError(f"{name}: expected a number or a list of three numbers, got {value!r}") from None
    if not np.all(np.isfinite(values)):
        raise UserError(f"{name}: expected finite numbers, got {value!r}")
    return values


BOX_ANCHORS = ("zero", "center")


def _is_positive_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


@dataclass(frozen=True)
class GridGeometry:
    """A box ``[box_min_nm, box_max_nm]`` in nanometres divided into a grid of ``shape`` voxels (X, Y, Z)."""

    box_min_nm: tuple
    box_max_nm: tuple
    shape: tuple

    def __post_init__(self):
        lo, hi = np.asarray(self.box_min_nm, float), np.asarray(self.box_max_nm, float)
        if lo.shape != (3,) or hi.shape != (3,) or not np.all(hi > lo):
            raise UserError(f"box: the maximum corner must exceed the minimum on every axis, got {lo} and {hi}")
        object.__setattr__(self, "box_min_nm", tuple(float(v) for v in lo))
        object.__setattr__(self, "box_max_nm", tuple(float(v) for v in hi))
        object.__setattr__(self, "shape", as_shape(self.shape, "shape"))

    @property
    def lo(self):
        return np.asarray(self.box_min_nm)

    @property
    def size_nm(self):
        return np.asarray(self.box_max_nm) - self.lo

    @property
    def spacing_nm(self):
        """Voxel edge length per axis, in nanometres."""
        return self.size_nm / np.asarray(self.shape)

    @classmethod
    def around(cls, points, shape, padding_nm=0.0, volume_dims_nm=None, anchor="zero"):
        """The box holding ``points`` (an (M, 3) array, or a list of them), ``padding_nm`` wider on each side.

        With ``volume_dims_nm`` the box has that size instead: per axis ``[-padding, volume_dims + padding]`` (the
        seed converter's box, anchored at zero as camera coordinates are), or, with ``anchor='center'``, centred on
        the points' bounding box.
        """
        if anchor not in BOX_ANCHORS:
            raise UserError(f"box_anchor: expected one of {', '.join(BOX_ANCHORS)}, got {anchor!r}")
        pts = (
            np.concatenate([np.asarray(p, np.float64).reshape(-1, 3) for p in points])
            if isinstance(points, (list, tuple))
            else np.asarray(points, np.float64).reshape(-1, 3)
        )
        pts = pts[np.all(np.isfinite(pts), axis=1)]
        if len(pts) == 0:
            raise UserError("box: there are no finite points to compute a box from")
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        if volume_dims_nm is not None:
            dims = as_triple(volume_dims_nm, "volume_dims")
            if np.any(dims <= 0):
                raise UserError(f"volume_dims: must be positive, got {volume_dims_nm!r}")
            lo = (lo + hi) / 2 - dims / 2 if anchor == "center" else np.zeros(3)
            hi = lo + dims
        pad = as_triple(padding_nm, "padding")
        if np.any(pad < 0):
            raise UserError(f"padding: must not be negative, got {padding_nm!r}")
        lo, hi = lo - pad, hi + pad
        hi = np.where(hi > lo, hi, lo + 1.0)  # a flat axis (2D data, accepted with --allow_2d) gets one voxel of 1 nm
        return cls(tuple(lo), tuple(hi), shape)

    def with_shape(self, shape):
        """The same box on another grid: resizing changes the spacing, not the box."""
        return GridGeometry(self.box_min_nm, self.box_max_nm, shape)

    def same_box(self, other, tolerance_nm=None):
        """Whether ``other`` covers the same box, whatever the grid: each corner to ``tolerance_nm`` (a number or
        [x, y, z]; default a thousandth of the smaller voxel)."""
        tolerance = 1e-3 * min(self.spacing_nm.min(), other.spacing_nm.min()) if tolerance_nm is None else tolerance_nm
        return np.allclose(self.box_min_nm, other.box_min_nm, atol=tolerance) and np.allclose(
            self.box_max_nm, other.box_max_nm, atol=tolerance
        )

    def describe(self):
        """The box as text: ``[x, y, z]–[x, y, z] nm``."""
        return f"{[round(v, 1) for v in self.box_min_nm]}–{[round(v, 1) for v in self.box_max_nm]} nm"

    def inside(self, points):
        """Boolean mask of the points that lie in the closed box."""
        points = np.asarray(points)
        return np.all((points >= self.lo) & (points <= np.asarray(self.box_max_nm)), axis=1)

    def to_voxel(self, points):
        """Continuous voxel coordinates: voxel ``i`` spans ``[i, i + 1)``, its centre is ``i + 0.5``."""
        return (np.asarray(points, np.float64) - self.lo) / self.spacing_nm

    def to_nm(self, voxel_coords):
        """Inverse of :meth:`to_voxel`; pass ``index + 0.5`` for voxel centres."""
        return self.lo + np.asarray(voxel_coords, np.float64) * self.spacing_nm

    def voxel_index(self, points):
        """Integer voxel index of each point (points on the maximum face belong to the last voxel)."""
        idx = np.floor(self.to_voxel(points)).astype(np.int64)
        return np.minimum(idx, np.asarray(self.shape) - 1)

    def affine(self):
        """NIfTI affine in micrometres mapping voxel index to voxel centre."""
        aff = np.eye(4)
        aff[:3, :3] = np.diag(self.spacing_nm / 1000.0)
        aff[:3, 3] = (self.lo + 0.5 * self.spacing_nm) / 1000.0
        return aff

    @classmethod
    def from_affine(cls, affine, shape):
        """The geometry a NIfTI affine (micrometres, voxel centres) and a grid shape describe."""
        affine = np.asarray(affine, np.float64)
        spacing = np.diag(affine[:3, :3]) * 1000.0
        lo = affine[:3, 3] * 1000.0 - 0.5 * spacing
        return cls(tuple(lo), tuple(lo + spacing * np.asarray(shape)), shape)

    def to_dict(self):
        return {
            "box_min_nm": list(self.box_min_nm),
            "box_max_nm": list(self.box_max_nm),
            "shape": list(self.shape),
            "spacing_nm": [float(v) for v in self.spacing_nm],
        }

    @classmethod
    def from_dict(cls, d):
        try:
            return cls(tuple(d["box_min_nm"]), tuple(d["box_max_nm"]), tuple(d["shape"]))
        except (KeyError, TypeError) as e:
            raise UserError(f"geometry: missing or malformed entry {e}") from None
