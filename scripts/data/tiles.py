"""Tiles of one large acquisition: random boxes cut out of it, each a training cloud of its own
(``scripts/convert_h5_to_nifti.py --tiles``)."""

import numpy as np
from scripts.data.geometry import as_triple
from scripts.runtime.errors import UserError

# tiles covering this fraction of a cloud's lateral extent or more hold mostly the same points: refused when the
# tiles are split into training and validation (suggest_tiles picks a quarter of the extent or less)
TILE_COVERAGE_LIMIT = 0.5


def cut_tiles(clouds, n_tiles, tile_size_nm, seed=0, min_points=10):
    """Cut ``n_tiles`` random boxes of ``tile_size_nm`` (x, y, z) out of the clouds, each rotated by a random
    angle about z and re-origined so the tile spans ``[0, tile_size_nm]``. Returns the tiles and the source
    cloud index of each."""
    size = as_triple(tile_size_nm, "tile_size")
    if np.any(size <= 0):
        raise UserError(f"tile_size: must be positive, got {tile_size_nm!r}")
    rng = np.random.default_rng(seed)
    tiles, sources = [], []
    for _ in range(n_tiles):
        for _attempt in range(100):
            src = int(rng.integers(len(clouds)))
            pts = clouds[src]
            lo, hi = pts.min(axis=0), pts.max(axis=0)
            centre = rng.uniform(lo, hi)
            centre[2] = (lo[2] + hi[2]) / 2
            angle = rng.uniform(0, 2 * np.pi)
            c, s = np.cos(angle), np.sin(angle)
            rel = pts - centre
            local = np.column_stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2]])
            local += size / 2
            keep = np.all((local >= 0) & (local <= size), axis=1)
            if keep.sum() >= min_points:
                tiles.append(local[keep])
                sources.append(src)
                break
        else:
            raise UserError(f"tile_size: no box of {list(size)} nm holds {min_points} points after 100 tries")
    return tiles, sources


def suggest_tiles(clouds):
    """A tile size that fits the data (half the smaller lateral extent, the whole axial range, rounded up to
    100 nm) and a tile count for one large acquisition: ``(n_tiles, [x, y, z] nm)``."""
    pts = np.concatenate(clouds)
    lo, hi = np.percentile(pts, 0.5, axis=0), np.percentile(pts, 99.5, axis=0)
    extent = hi - lo
    lateral = max(100.0, np.ceil(min(extent[0], extent[1]) / 2 / 100) * 100)
    axial = max(100.0, np.ceil(extent[2] / 100) * 100 + 100)
    return 64, [float(lateral), float(lateral), float(axial)]


def check_tile_size(source, clouds, tile_size):
    """Refuse tiles that cover half or more of the largest cloud's lateral extent: every tile would then hold most of
    the same points, in training and in validation alike."""
    size = as_triple(tile_size, "tile_size")
    largest = max(clouds, key=lambda c: float(np.prod(np.ptp(c[:, :2], axis=0))))
    extent = np.percentile(largest, 99.5, axis=0) - np.percentile(largest, 0.5, axis=0)  # as suggest_tiles measures
    covered = size[0] * size[1] / max(float(extent[0] * extent[1]), 1e-9)
    if covered >= TILE_COVERAGE_LIMIT:
        _, fits = suggest_tiles([largest])
        fits = [round(fits[0]), round(fits[1]), round(float(size[2]))]
        raise UserError(
            f"tile_size: tiles of {[round(float(v)) for v in size[:2]]} nm cover {100 * covered:.0f} % of the data's "
            f"{extent[0]:.0f} × {extent[1]:.0f} nm extent in {source}, so training and validation tiles would hold "
            f"the same points; use smaller tiles (--tile_size {fits} fits this data)"
        )
