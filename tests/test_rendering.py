"""The renderer's views: from above (x across, y up, coloured by z) and from the side (x across, z up)."""

import numpy as np
from matplotlib.image import imread
from scripts.evaluation.rendering import main as render


def _bright(png):
    """Which pixels of a rendered PNG are lit (any channel above a fifth of full brightness)."""
    return imread(png)[..., :3].max(axis=2) > 0.2


def test_a_side_view_shows_a_vertical_line_that_the_top_view_collapses(tmp_path, capsys):
    """A line of localizations along z, 400 nm deep, at x = 500 nm in a 1000 × 2000 nm field: from above it is one
    spot, from the side (xz) a column through the whole depth, at the same x."""
    rng = np.random.default_rng(0)
    line = np.column_stack([np.full(2000, 500.0), np.full(2000, 1000.0), rng.uniform(-200, 200, 2000)])
    corners = np.array([[0.0, 0.0, -200.0], [1000.0, 2000.0, 200.0]])  # the field's extent
    cloud = tmp_path / "line.csv"
    np.savetxt(cloud, np.vstack([line, corners]), delimiter=",", header="x,y,z", comments="")
    render(str(cloud), str(tmp_path / "top.png"), pixel_nm=10.0)
    render(str(cloud), str(tmp_path / "side.png"), pixel_nm=10.0, view="xz")
    assert "xz view, 100×40 px at 10.0 nm" in capsys.readouterr().out
    top, side = _bright(tmp_path / "top.png"), _bright(tmp_path / "side.png")
    assert top.shape == (200, 100) and side.shape == (40, 100)  # rows: y (2000 nm) from above, z (400 nm) from the side
    lit_rows = np.flatnonzero(side[:, 45:56].any(axis=1))
    assert len(lit_rows) >= 0.8 * 40  # the line runs through the whole depth
    assert abs(np.argmax(side.sum(axis=0)) - 50) <= 2  # at x = 500 nm
    assert np.ptp(np.flatnonzero(top[:, 45:56].any(axis=1))) <= 8  # from above: one spot, a few pixels tall
