"""Points to grids and grids back to points, through :class:`scripts.data.geometry.GridGeometry`.

Pure functions over arrays. Grids are float32 arrays indexed (X, Y, Z).
"""

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scripts.data.geometry import as_triple
from scripts.runtime.errors import UserError
from scripts.runtime.settings import EXPORT_METHODS, NORMALIZATIONS, ONE_PER_VOXEL, SPLATS, VOXELIZATIONS

GAUSSIAN_TRUNCATE = 4.0  # kernel radius in sigmas, as scipy.ndimage


def sigma_in_voxels(sigma, unit, geometry):
    """σ per axis in voxels, from a number or a list of three in ``unit`` ('voxel' or 'nm')."""
    values = as_triple(sigma, "sigma")
    if np.any(values <= 0):
        raise UserError(f"sigma: must be positive, got {sigma!r}")
    if unit in ("voxel", "voxels"):
        return values
    if unit == "nm":
        return values / geometry.spacing_nm
    raise UserError(f"sigma_unit: expected 'voxel' or 'nm', got {unit!r}")


def voxelize(points, geometry, method="gaussian", sigma_voxels=1.0, splat="nearest"):
    """Grid of the points in ``geometry``'s box.

    Args:
        points: (M, 3) coordinates in nanometres.
        geometry: the box and grid shape.
        method: 'occupancy' (1 where any point falls), 'density' (points per voxel) or 'gaussian' (density
            blurred by a normalised Gaussian of ``sigma_voxels`` per axis, zero outside the box).
        sigma_voxels: Gaussian width in voxels, a number or one per axis.
        splat: how a point enters the density: 'nearest' (all of it in its voxel) or 'trilinear' (shared among
            the 8 nearest voxel centres by linear weights, so the grid keeps the points' sub-voxel positions;
            weights beyond the grid go to its border voxel). Occupancy is always nearest.

    Returns:
        ``(grid, n_outside)``: the float32 grid and the number of points outside the box, which are dropped.
    """
    if method not in VOXELIZATIONS:
        raise UserError(f"method: expected one of {', '.join(VOXELIZATIONS)}, got {method!r}")
    if splat not in SPLATS:
        raise UserError(f"splat: expected one of {', '.join(SPLATS)}, got {splat!r}")
    points = np.asarray(points)
    inside = geometry.inside(points)
    size = int(np.prod(geometry.shape))
    if method == "occupancy" or splat == "nearest":
        idx = geometry.voxel_index(points[inside])
        # Fortran order, as NIfTI stores voxels: writing then needs no reordered copy of the grid
        flat = np.ravel_multi_index(tuple(idx.T), geometry.shape, order="F")
        grid = np.zeros(size, dtype=np.float32)
        if method == "occupancy":
            grid[flat] = 1.0
        else:
            grid += np.bincount(flat, minlength=size).astype(np.float32)
    else:
        flat, weights = trilinear_weights(geometry.to_voxel(points[inside]), geometry.shape)
        grid = np.bincount(flat.ravel(), weights.ravel(), minlength=size).astype(np.float32)
    grid = grid.reshape(geometry.shape, order="F")
    if method == "gaussian":
        gaussian_blur_(grid, sigma_voxels)
    return grid, int(len(points) - inside.sum())


def trilinear_weights(voxel_coords, shape):
    """Fortran-order flat indices and weights (M, 8) of the 8 voxel centres around each point (continuous voxel
    coordinates, centres at ``i + 0.5``); the weights of a point sum to 1, indices beyond the grid are clamped."""
    y = np.asarray(voxel_coords, np.float64) - 0.5
    low = np.floor(y)
    frac = y - low
    low = low.astype(np.int64)
    upper = np.asarray(shape) - 1
    flat, weights = [], []
    for corner in range(8):
        bits = np.array([(corner >> a) & 1 for a in range(3)])
        index = np.clip(low + bits, 0, upper)
        weights.append(np.prod(np.where(bits, frac, 1 - frac), axis=1))
        flat.append(np.ravel_multi_index(tuple(index.T), shape, order="F"))
    return np.stack(flat, axis=1), np.stack(weights, axis=1)


def gaussian_kernel(sigma, truncate=GAUSSIAN_TRUNCATE):
    """The normalised 1D Gaussian that ``scipy.ndimage.gaussian_filter1d`` uses (radius ``truncate``·σ)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 / float(sigma) ** 2 * x**2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur_(grid, sigma_voxels):
    """Blur ``grid`` in place with a normalised separable Gaussian (zero outside the grid, truncated at 4σ).

    Along the contiguous axis scipy's filter is fastest; along strided axes a blocked stencil (shifted slices
    accumulated in cache-sized blocks) is about twice as fast and needs no grid-sized temporary.
    """
    for axis, s in enumerate(as_triple(sigma_voxels, "sigma")):
        if s <= 0:
            continue
        if grid.strides[axis] == grid.itemsize:
            gaussian_filter1d(grid, s, axis=axis, mode="constant", truncate=GAUSSIAN_TRUNCATE, output=grid)
        else:
            _stencil_(grid, gaussian_kernel(s), axis)
    return grid


def _stencil_(grid, kernel, axis, block_elements=1 << 16):
    """Correlate ``grid`` with ``kernel`` along ``axis`` in place, block by block along the slowest other axis."""
    r, n = len(kernel) // 2, grid.shape[axis]
    other = max((a for a in range(grid.ndim) if a != axis), key=lambda a: grid.strides[a])
    step = max(1, block_elements * grid.shape[other] // grid.size)

    def along(i, j):
        index = [slice(None)] * grid.ndim
        index[axis] = slice(i, j)
        return tuple(index)

    for start in range(0, grid.shape[other], step):
        index = [slice(None)] * grid.ndim
        index[other] = slice(start, start + step)
        block = grid[tuple(index)]
        padded_shape = list(block.shape)
        padded_shape[axis] += 2 * r
        padded = np.zeros(padded_shape, np.float32, order="F" if grid.flags.f_contiguous else "C")
        padded[along(r, r + n)] = block
        term = np.empty_like(block)
        np.multiply(padded[along(0, n)], kernel[0], out=block)
        for i in range(1, len(kernel)):
            np.multiply(padded[along(i, i + n)], kernel[i], out=term)
            block += term


def normalize_(grid, rule="max", constant=None):
    """Scale ``grid`` in place by a named rule; returns the divisor used (recorded so density can be recovered).

    'max' divides by the volume's maximum; 'percentile' divides by ``constant`` (a dataset-wide percentile, see
    :func:`dataset_percentile`) and clips to [0, 1]; 'none' leaves values as they are (divisor 1).
    """
    if rule == "none":
        return 1.0
    if rule == "max":
        divisor = float(grid.max())
    elif rule == "percentile":
        divisor = float(constant)
    else:
        raise UserError(f"normalize: expected one of {', '.join(NORMALIZATIONS)}, got {rule!r}")
    if divisor > 0:
        grid /= np.float32(divisor)
    if rule == "percentile":
        np.clip(grid, 0.0, 1.0, out=grid)
    return divisor


def as_training_grid(grid, dataset_info, background=0.0):
    """A decoded ``grid`` (values in [0, 1]) on the scale of the training grids that ``dataset_info`` describes.

    Two steps:
    - **Rescale.** Under the 'max' normalization every training grid has a maximum of 1, and the points per unit
      of grid mass were counted on that scale. So the grid is divided by its maximum.
    - **Restore the background.** Every voxel is raised to at least ``background``. The decoder draws a grid's
      faint voxels as 0, and with them the sparse background localizations would be missing from the points. The
      fine stage records the level: the training clouds' density in the voxels their reconstructions draw as 0
      (:func:`scripts.networks.fine_stage.background_level`).
    """
    out = np.array(grid, np.float32)  # one copy, changed in place: the caller's grid stays as it was
    peak = float(out.max()) if out.size else 0.0
    if (dataset_info.get("normalization") or {}).get("rule") == "max" and peak > 0:
        out /= np.float32(peak)
    if background:
        np.maximum(out, np.float32(background), out=out)
    return out


def dataset_percentile(samples, q):
    """The ``q``-th percentile of the non-zero voxel values in ``samples`` (arrays drawn from every grid)."""
    values = np.concatenate([np.asarray(s).ravel() for s in samples]) if len(samples) else np.zeros(0)
    values = values[values > 0]
    if len(values) == 0:
        raise UserError("normalize: every grid is empty, there is no percentile to scale by")
    return float(np.percentile(values, q))


def grid_mass_um3(grid, geometry):
    """Integral of the grid over its box, in (intensity · µm³): invariant under resizing the grid."""
    return float(np.asarray(grid).sum(dtype=np.float64) * np.prod(geometry.spacing_nm / 1000.0))


def point_count(grid, geometry, num_points=None, points_per_mass=None):
    """How many points a cloud drawn from ``grid`` gets: ``num_points``, or by default the training data's density,
    ``points_per_mass * grid_mass_um3(grid)``."""
    if num_points is None:
        if points_per_mass is None:
            raise UserError("num_points: give num_points or the training data's points_per_mass")
        num_points = int(round(points_per_mass * grid_mass_um3(grid, geometry)))
    if num_points < 0:
        raise UserError(f"num_points: must not be negative, got {num_points}")
    return int(num_points)


EXPORT_THRESHOLD = 0.1  # the voxel exports' default: grid values (in [0, 1]) at or below it are background


def grid_to_points(
    grid, geometry, method="probabilistic", threshold=EXPORT_THRESHOLD, num_points=None, points_per_mass=None, rng=None
):
    """Points in nanometres drawn from a grid, inside ``geometry``'s box.

    Args:
        grid: (X, Y, Z) array of values in [0, 1] (a leading channel axis of 1 is accepted).
        geometry: the box the grid covers (its shape may differ from the grid's: the box is what counts).
        method: 'probabilistic' draws ``num_points`` voxels with probability proportional to their value;
            'weighted' gives each voxel a number of points proportional to its value (rounded, ``num_points`` in
            total); 'center' puts one point at each voxel centre; 'random' one point uniformly inside each voxel.
            Only voxels above ``threshold`` take part; all but 'center' jitter points uniformly inside the voxel.
        num_points: how many points for 'probabilistic' and 'weighted'; defaults to
            ``points_per_mass * grid_mass_um3(grid)`` (the training data's density).
        rng: a ``numpy.random.Generator`` or a seed.
    """
    if method not in EXPORT_METHODS:
        raise UserError(f"method: expected one of {', '.join(EXPORT_METHODS)}, got {method!r}")
    grid = np.asarray(grid)
    if grid.ndim == 4 and grid.shape[0] == 1:
        grid = grid[0]
    geometry = geometry.with_shape(grid.shape)
    rng = np.random.default_rng(rng)
    candidates = np.flatnonzero(grid > threshold)  # C-order flat indices, as np.unravel_index expects
    if len(candidates) == 0:
        return np.zeros((0, 3))
    if method in ONE_PER_VOXEL:
        chosen = candidates
    else:
        num_points = point_count(grid, geometry, num_points, points_per_mass)
        weights = grid.ravel()[candidates].astype(np.float64)
        if method == "probabilistic":
            chosen = rng.choice(candidates, size=num_points, p=weights / weights.sum())
        else:
            counts = np.round(weights * (num_points / weights.sum())).astype(np.int64)
            chosen = np.repeat(candidates, counts)
    idx = np.stack(np.unravel_index(chosen, grid.shape), axis=1).astype(np.float64)
    offset = 0.5 if method == "center" else rng.random(idx.shape)
    return geometry.to_nm(idx + offset)


def voxelize_like(points, dataset_info):
    """The grid the converter would have made of ``points`` for the dataset ``dataset_info`` describes: its box,
    grid, method, σ, splat and normalisation (with the recorded dataset-wide constant)."""
    from scripts.data.geometry import GridGeometry

    geometry = GridGeometry.from_dict(dataset_info["geometry"])
    voxelization, normalization = dataset_info["voxelization"], dataset_info["normalization"]
    grid, _ = voxelize(
        points, geometry, voxelization["method"], voxelization["sigma_voxels"], voxelization.get("splat", "nearest")
    )
    normalize_(grid, normalization["rule"], normalization.get("constant"))
    return grid
