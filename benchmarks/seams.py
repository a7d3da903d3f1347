"""Seam measures of tiled sampling (``benchmarks/benchmark_large_field.py`` and ``tests/test_large_fields.py``): where
tiles meet, and how much a field changes there against elsewhere."""

import numpy as np
import torch
from scripts.sampling.large_fields import tile_starts


def tile_edges(size, tile, overlap):
    """Where tiles of :func:`tile_starts` begin or end inside ``[0, size]`` (the field's own faces left out)."""
    starts = tile_starts(size, tile, overlap)
    return sorted({e for a in starts for e in (a, a + min(tile, size))} - {0, size})


def seam_jump(volume, edges, axis, period=1):
    """How much more a volume (..., X, Y, Z) changes across the planes at ``edges`` along spatial ``axis`` (0 = x)
    than across the other planes: the ratio of mean absolute differences between neighbouring planes, 1 where
    tiles meet without a seam. With ``period`` (a decoded grid: its upsampling factor), the other planes are those
    at the same position within a period, since upsampling makes neighbours within a latent voxel more alike."""
    volume = torch.as_tensor(volume, dtype=torch.float32)
    dim = volume.ndim - 3 + axis
    n = volume.shape[dim]
    steps = (volume.narrow(dim, 1, n - 1) - volume.narrow(dim, 0, n - 1)).abs()
    steps = steps.mean(dim=tuple(d for d in range(volume.ndim) if d != dim)).numpy()
    planes = np.arange(1, n)  # the step into plane i
    at_edge = np.isin(planes, edges)
    same_phase = np.isin(planes % period, np.asarray(edges) % period) & ~at_edge
    return float(steps[at_edge].mean() / steps[same_phase].mean())


def seam_contrast(grid, boundaries, axis=0, width=1, margin=8):
    """Relative step of the mean grid value at tile boundaries: planes along ``axis`` within ``width`` voxels of any
    of ``boundaries`` (plane indices) against the other planes, ``boundary / interior - 1``; the ``margin`` planes
    next to the grid's faces, where convolutions see their zero padding, take no part."""
    grid = np.asarray(grid)
    means = grid.mean(axis=tuple(a for a in range(grid.ndim) if a != axis), dtype=np.float64)
    planes = np.arange(len(means))
    near = np.zeros(len(means), bool)
    for b in boundaries:
        near |= np.abs(planes + 0.5 - b) <= width
    inside = (planes >= margin) & (planes < len(means) - margin)
    if not (near & inside).any() or not (~near & inside).any():
        return 0.0
    return float(means[near & inside].mean() / max(means[~near & inside].mean(), 1e-12) - 1.0)
