"""Pictures of grids: orthogonal maximum-intensity projections, tiled for TensorBoard and PNG previews."""

import numpy as np

GAP = 2  # pixels between tiles


def projections(volume):
    """One tile with the three maximum-intensity projections of an (X, Y, Z) volume side by side:
    along z (an X × Y image), along y (X × Z) and along x (Y × Z), each scaled to [0, 1]."""
    v = np.asarray(volume, dtype=np.float32)
    v = v.reshape(v.shape[-3:])
    scale = float(v.max()) if v.max() > 0 else 1.0
    mips = [v.max(axis=2), v.max(axis=1), v.max(axis=0)]
    height = max(m.shape[0] for m in mips)
    tiles = [np.pad(m / scale, ((0, height - m.shape[0]), (0, GAP))) for m in mips]
    return np.concatenate(tiles, axis=1)[:, :-GAP]


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
