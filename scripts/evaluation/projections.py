"""Pictures of grids: orthogonal maximum-intensity projections, tiled for TensorBoard and PNG previews."""

import numpy as np

GAP = 2  # pixels between tiles


def projections(volume):
    """The three maximum-intensity projections of an (X, Y, Z) volume as one orthogonal-view tile in [0, 1], laid
    out as microscopists read them: along z top-left (x across, y up), along y below it (x across, z up), along x
    to its right (z across, y up), so shared axes line up; :func:`scripts.evaluation.rendering.render_points` uses the same x/y.
    """
    v = np.asarray(volume, dtype=np.float32)
    v = v.reshape(v.shape[-3:])
    v = v / (float(v.max()) if v.max() > 0 else 1.0)
    nx, ny, nz = v.shape
    tile = np.zeros((ny + GAP + nz, nx + GAP + nz), np.float32)
    tile[:ny, :nx] = v.max(axis=2).T[::-1]
    tile[ny + GAP :, :nx] = v.max(axis=1).T[::-1]
    tile[:ny, nx + GAP :] = v.max(axis=0)[::-1]
    return tile


def projection_grid(rows):
    """A 2D image in [0, 1] of ``rows`` (a list of lists of volumes): each volume as :func:`projections`."""
    tiles = [[projections(v) for v in row] for row in rows]
    height = max(t.shape[0] for row in tiles for t in row)
    width = max(t.shape[1] for row in tiles for t in row)
    canvas = np.zeros((len(tiles) * (height + GAP) - GAP, max(map(len, tiles)) * (width + GAP) - GAP), np.float32)
    for i, row in enumerate(tiles):
        for j, t in enumerate(row):
            y, x = i * (height + GAP), j * (width + GAP)
            canvas[y : y + t.shape[0], x : x + t.shape[1]] = t
    return canvas
