"""SMLM-style renderings of point clouds: an x/y histogram at ~10–20 nm pixels, Gaussian-blurred, coloured by z,
with a scale bar. Usable from the command line on any cloud the readers accept, from above or from the side::

    python scripts/render.py --input outputs/samples/pointcloud/sample_0000.csv --output sample_0000.png
    python scripts/render.py --input outputs/samples/pointcloud/sample_0000.csv --output side.png --view xz
"""

from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from scripts.runtime.atomic_write import atomic_path
from scripts.runtime.errors import UserError

SCALE_BARS_NM = (100, 200, 500, 1000, 2000, 5000, 10000)
MAX_PIXELS = 40e6  # the RGB image is float64: 40 million pixels are about 1 GB


def render_points(points, pixel_nm=15.0, blur_px=1.0, xy_range=None, z_range=None, colormap="turbo"):
    """An RGB image (H, W, 3) in [0, 1] of an (M, 3) cloud in nm: brightness = blurred localization density,
    hue = mean z of the localizations in each pixel, and a white scale bar (its length in ``meta["bar_nm"]``).

    Args:
        points: (M, 3) x, y, z in nm.
        pixel_nm: rendered pixel size in nm.
        blur_px: Gaussian blur σ in pixels.
        xy_range: ((x_min, x_max), (y_min, y_max)) in nm; default the cloud's extent (pass the training box to
            compare clouds on one canvas).
        z_range: (z_min, z_max) in nm mapped onto the colour map; default the cloud's z extent.

    Returns:
        ``(image, meta)`` with ``meta = {"pixel_nm", "bar_nm", "bar_px"}``.
    """
    import matplotlib

    points = np.asarray(points, np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise UserError(f"points: expected an (M, 3) array, got shape {points.shape}")
    if pixel_nm <= 0:
        raise UserError(f"pixel_nm: must be positive, got {pixel_nm}")
    if xy_range is None:
        xy_range = (
            [(points[:, 0].min(), points[:, 0].max()), (points[:, 1].min(), points[:, 1].max())]
            if len(points)
            else [(0, 1), (0, 1)]
        )
    (x0, x1), (y0, y1) = xy_range
    bins = [max(1, int(np.ceil((x1 - x0) / pixel_nm))), max(1, int(np.ceil((y1 - y0) / pixel_nm)))]
    if bins[0] * bins[1] > MAX_PIXELS:
        raise UserError(
            f"pixel_nm: {pixel_nm:g} nm pixels over {x1 - x0:.3g} × {y1 - y0:.3g} nm make a {bins[0]} × {bins[1]} px "
            f"image (more than {MAX_PIXELS / 1e6:.0f} million pixels); use a larger --pixel_nm or a cloud without "
            "far outliers"
        )
    edges = [x0 + pixel_nm * np.arange(bins[0] + 1), y0 + pixel_nm * np.arange(bins[1] + 1)]
    counts, _, _ = np.histogram2d(points[:, 0], points[:, 1], bins=edges)
    z_sum, _, _ = np.histogram2d(points[:, 0], points[:, 1], bins=edges, weights=points[:, 2])
    density = gaussian_filter(counts, blur_px)
    mean_z = gaussian_filter(z_sum, blur_px) / np.maximum(density, 1e-12)
    if z_range is None:
        z_range = (points[:, 2].min(), points[:, 2].max()) if len(points) else (0, 1)
    z_norm = np.clip((mean_z - z_range[0]) / max(z_range[1] - z_range[0], 1e-9), 0, 1)
    top = np.percentile(density[density > 0], 99.5) if np.any(density > 0) else 1.0
    brightness = np.clip(density / top, 0, 1)
    rgb = matplotlib.colormaps[colormap](z_norm)[..., :3] * brightness[..., None]
    image = np.transpose(rgb, (1, 0, 2))[::-1]  # rows = y (up), columns = x
    bar_nm = max([b for b in SCALE_BARS_NM if b <= 0.25 * (x1 - x0)] or [SCALE_BARS_NM[0]])
    bar_px = int(round(bar_nm / pixel_nm))
    h, w = image.shape[:2]
    thickness, margin = max(2, h // 100), max(3, w // 40)
    image[h - margin - thickness : h - margin, max(0, w - margin - bar_px) : w - margin] = 1.0
    return image, {"pixel_nm": pixel_nm, "bar_nm": bar_nm, "bar_px": bar_px}


VIEWS = {"xy": (0, 1, 2), "xz": (0, 2, 1), "yz": (1, 2, 0)}  # the image's horizontal, vertical and colour axes


def main(input, output=None, pixel_nm=15.0, blur_px=1.0, key=None, index=0, pixel_size=None, view="xy"):
    """Render cloud ``index`` of ``input`` (CSV or HDF5, nm) to a PNG (default: ``input`` with ``.png``). ``view``:
    ``xy`` (from above, coloured by z), or a side view, ``xz`` (coloured by y) or ``yz`` (coloured by x), which
    shows a cloud's depth."""
    import matplotlib.pyplot as plt
    from scripts.data.pointclouds import read_point_clouds

    if view not in VIEWS:
        raise UserError(f"view: expected one of {', '.join(VIEWS)}, got {view!r}")
    clouds, _ = read_point_clouds(input, key=key, pixel_size_nm=pixel_size)
    if not 0 <= index < len(clouds):
        raise UserError(f"{input}: has {len(clouds)} clouds, no index {index}")
    image, meta = render_points(clouds[index][:, list(VIEWS[view])], pixel_nm, blur_px)
    output = Path(output) if output else Path(input).with_suffix(".png")
    with atomic_path(output) as tmp:
        plt.imsave(tmp, np.clip(image, 0, 1), format="png")
    size = f"{image.shape[1]}×{image.shape[0]} px"
    print(f"wrote {output} ({view} view, {size} at {pixel_nm} nm; scale bar {meta['bar_nm']} nm)")
