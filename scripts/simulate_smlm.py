"""Simulated 3D SMLM localization clouds of microtubule-like filaments: the bundle's built-in demo data.

Each cloud holds a few smooth random filaments crossing a thin slab. Every filament is labelled as a hollow tube
(points on its surface), the points get Gaussian localization noise, and a few percent of uniform background
points are added. All coordinates are in nanometres and lie inside the given box.

Usage from the bundle root::

    python scripts/simulate_smlm.py --output data/demo/microtubules.h5 --n_clouds 64 --seed 0
"""

import inspect
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from scripts.data.geometry import as_triple  # noqa: E402
from scripts.data.pointclouds import write_point_clouds_h5  # noqa: E402
from scripts.runtime import command_line  # noqa: E402
from scripts.runtime.errors import UserError, fail  # noqa: E402

# Spacing of the nodes along a filament centreline (nm); well below the tube radius and the localization
# precision, so the discretisation is invisible in the points.
_STEP_NM = 10.0
# Rounds of redrawing points that fell outside the box before giving up (only reached when the box is much
# thinner than the localization noise).
_MAX_REDRAW_ROUNDS = 100


def _filament_centreline(rng, box_min, box_size, persistence_length_nm, z_half_range_nm):
    """One random smooth centreline as nodes ``(K, 3)`` in nm, ``_STEP_NM`` apart laterally.

    Laterally a persistent random walk (the tangent angle diffuses so that tangents decorrelate as
    ``exp(-s / persistence_length_nm)``), started at a random point in the box and grown both ways for one
    lateral box diagonal each, so it crosses the field of view. Axially a smooth sum of three sinusoids of
    wavelength ``0.5-2 x persistence_length_nm`` around the slab centre, bounded by ``z_half_range_nm``.
    """
    half_steps = int(np.ceil(np.hypot(box_size[0], box_size[1]) / _STEP_NM))
    n_nodes = 2 * half_steps + 1
    dtheta = rng.normal(0.0, np.sqrt(2.0 * _STEP_NM / persistence_length_nm), size=n_nodes - 1)
    theta = rng.uniform(0.0, 2.0 * np.pi) + np.concatenate([[0.0], np.cumsum(dtheta)])
    steps = _STEP_NM * np.stack([np.cos(theta[:-1]), np.sin(theta[:-1])], axis=1)
    xy = np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
    start = box_min[:2] + rng.uniform(0.0, 1.0, size=2) * box_size[:2]
    xy += start - xy[half_steps]  # the start point sits in the middle of the walk

    s = _STEP_NM * np.arange(n_nodes)
    weights = rng.dirichlet(np.ones(3))  # sum to 1, so |z - centre| <= amplitude
    wavelengths = persistence_length_nm * rng.uniform(0.5, 2.0, size=3)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=3)
    wave = np.sin(2.0 * np.pi * s[:, None] / wavelengths + phases) @ weights
    amplitude = rng.uniform(0.0, z_half_range_nm)
    z = box_min[2] + 0.5 * box_size[2] + amplitude * wave
    return np.column_stack([xy, z])


def _tube_points(rng, nodes, tangents, n_points, tube_radius_nm, sigma_nm):
    """``n_points`` points on the tube surface around random centreline nodes, plus localization noise (nm)."""
    idx = rng.integers(len(nodes), size=n_points)
    t = tangents[idx]
    # The tangent always has a lateral component, so its cross product with z is never zero.
    n1 = np.cross(t, [0.0, 0.0, 1.0])
    n1 /= np.linalg.norm(n1, axis=1, keepdims=True)
    n2 = np.cross(t, n1)
    phi = rng.uniform(0.0, 2.0 * np.pi, size=(n_points, 1))
    along = rng.uniform(0.0, _STEP_NM, size=(n_points, 1))  # spread points between nodes
    points = nodes[idx] + along * t + tube_radius_nm * (np.cos(phi) * n1 + np.sin(phi) * n2)
    return points + rng.normal(0.0, 1.0, size=(n_points, 3)) * sigma_nm


def simulate_microtubules(
    n_clouds,
    seed=0,
    box_min_nm=(0.0, 0.0, -300.0),
    box_size_nm=(5000.0, 5000.0, 600.0),
    filaments_per_cloud=(3, 6),
    mean_points=10000,
    points_spread=0.3,
    tube_radius_nm=25.0,
    lateral_precision_nm=10.0,
    axial_precision_nm=40.0,
    background_fraction=0.03,
    persistence_length_nm=3000.0,
):
    """Simulate microtubule-like 3D SMLM localization clouds.

    Args:
        n_clouds: number of clouds, >= 1.
        seed: seed of ``numpy.random.default_rng``; the same seed gives bit-identical clouds.
        box_min_nm: minimum corner (x, y, z) of the box holding every point, nm (absolute coordinates).
        box_size_nm: box edge lengths (x, y, z), nm; a thin slab in z, as in SMLM.
        filaments_per_cloud: (min, max) number of filaments per cloud, inclusive, drawn uniformly.
        mean_points: mean number of points per cloud.
        points_spread: relative spread of the point count: each count is drawn uniformly from
            ``mean_points * (1 +- points_spread)``; in [0, 1).
        tube_radius_nm: radius of the labelled hollow tube around each centreline, nm.
        lateral_precision_nm: standard deviation of the localization noise on x and y, nm.
        axial_precision_nm: standard deviation of the localization noise on z, nm.
        background_fraction: fraction of each cloud's points drawn uniformly over the box; in [0, 1).
        persistence_length_nm: length over which a filament's lateral direction decorrelates (by 1/e), nm.

    Returns:
        A list of ``n_clouds`` float32 arrays of shape ``(M_i, 3)``: x, y, z in nm, in random order, all inside
        ``[box_min_nm, box_min_nm + box_size_nm]``.
    """
    box_min = as_triple(box_min_nm, "box_min_nm")
    box_size = as_triple(box_size_nm, "box_size_nm")
    if not isinstance(n_clouds, (int, np.integer)) or n_clouds < 1:
        fail("n_clouds", f"must be an integer >= 1, got {n_clouds!r}")
    if np.any(box_size <= 0):
        fail("box_size_nm", f"every size must be > 0, got {box_size_nm!r}")
    try:
        fil_lo, fil_hi = (int(v) for v in filaments_per_cloud)
    except (TypeError, ValueError):
        raise UserError(f"filaments_per_cloud: expected (min, max), got {filaments_per_cloud!r}") from None
    if not 1 <= fil_lo <= fil_hi:
        fail("filaments_per_cloud", f"must satisfy 1 <= min <= max, got {filaments_per_cloud!r}")
    if not mean_points >= 1:
        fail("mean_points", f"must be >= 1, got {mean_points!r}")
    if not 0 <= points_spread < 1:
        fail("points_spread", f"must be in [0, 1), got {points_spread!r}")
    if not 0 <= background_fraction < 1:
        fail("background_fraction", f"must be in [0, 1), got {background_fraction!r}")
    for name, value in [
        ("tube_radius_nm", tube_radius_nm),
        ("lateral_precision_nm", lateral_precision_nm),
        ("axial_precision_nm", axial_precision_nm),
    ]:
        if not value >= 0:
            fail(name, f"must be >= 0, got {value!r}")
    if not persistence_length_nm > 0:
        fail("persistence_length_nm", f"must be > 0, got {persistence_length_nm!r}")
    box_max = box_min + box_size

    rng = np.random.default_rng(seed)
    sigma = np.array([lateral_precision_nm, lateral_precision_nm, axial_precision_nm], dtype=np.float64)
    # Keep the centrelines far enough from the slab faces that few noisy points need redrawing.
    z_half_range = max(0.0, 0.5 * box_size[2] - tube_radius_nm - 2.0 * axial_precision_nm)
    lo = max(1, int(round(mean_points * (1.0 - points_spread))))
    hi = max(lo, int(round(mean_points * (1.0 + points_spread))))

    clouds = []
    for _ in range(int(n_clouds)):
        n_points = int(rng.integers(lo, hi, endpoint=True))
        n_background = int(round(background_fraction * n_points))
        n_filaments = int(rng.integers(fil_lo, fil_hi, endpoint=True))
        nodes, tangents = _centrelines(rng, n_filaments, box_min, box_size, persistence_length_nm, z_half_range)
        signal = _signal(rng, nodes, tangents, n_points - n_background, tube_radius_nm, sigma, box_min, box_max)
        background = box_min + rng.uniform(0.0, 1.0, size=(n_background, 3)) * box_size
        points = np.concatenate(signal + [background])[rng.permutation(n_points)]
        # Rounding is monotonic, so the float32 points stay inside the float32-rounded box.
        clouds.append(points.astype(np.float32))
    return clouds


def _centrelines(rng, n_filaments, box_min, box_size, persistence_length_nm, z_half_range):
    """Nodes and unit tangents of the in-box parts of ``n_filaments`` centrelines. Nodes are equally spaced, so
    sampling them uniformly samples the filaments uniformly per length."""
    box_max = box_min + box_size
    nodes, tangents = [], []
    for _ in range(n_filaments):
        line = _filament_centreline(rng, box_min, box_size, persistence_length_nm, z_half_range)
        grad = np.gradient(line, axis=0)
        inside = np.all((line >= box_min) & (line <= box_max), axis=1)
        nodes.append(line[inside])
        tangents.append(grad[inside] / np.linalg.norm(grad[inside], axis=1, keepdims=True))
    return np.concatenate(nodes), np.concatenate(tangents)


def _signal(rng, nodes, tangents, n, tube_radius_nm, sigma, box_min, box_max):
    """``n`` labelled points on the tubes, with localization noise, all inside the box (points that fall outside
    are drawn again); a list of arrays."""
    signal, missing = [], n
    for _ in range(_MAX_REDRAW_ROUNDS):
        if missing == 0:
            return signal
        candidates = _tube_points(rng, nodes, tangents, missing, tube_radius_nm, sigma)
        kept = candidates[np.all((candidates >= box_min) & (candidates <= box_max), axis=1)]
        signal.append(kept)
        missing -= len(kept)
    if missing:
        size = [float(v) for v in box_max - box_min]
        fail("box_size_nm", f"{size} is too thin for the localization noise: points keep falling outside")
    return signal


def main(output, n_clouds=64, seed=0, overwrite=False, **params):
    """Simulate microtubule-like clouds and write them to an HDF5 file in the training layout.

    Args:
        output: output ``.h5`` path.
        n_clouds: number of clouds.
        seed: random seed; the same seed gives the same file contents.
        overwrite: replace ``output`` if it exists (otherwise refuse).
        **params: any other keyword of :func:`simulate_microtubules`, e.g. ``--mean_points 20000``,
            ``--box_size_nm [8000,8000,300]``.
    """
    for name in params:
        if name not in SIMULATION_OPTIONS:
            fail(f"--{name}", f"unknown option; choose from {', '.join(SIMULATION_OPTIONS)}")
    output = Path(output)
    if output.exists() and not overwrite:
        fail(output, "already exists; pass --overwrite to replace it")
    clouds = simulate_microtubules(n_clouds, seed=seed, **params)
    write_point_clouds_h5(output, clouds)
    counts = [len(c) for c in clouds]
    print(
        f"wrote {len(clouds)} clouds ({min(counts)}-{max(counts)} points, mean {np.mean(counts):.0f}) "
        f"to {output} (nm, seed {seed})"
    )


SIMULATION_OPTIONS = sorted(set(inspect.signature(simulate_microtubules).parameters) - {"n_clouds", "seed"})

if __name__ == "__main__":
    command_line.main(main, extra_flags=SIMULATION_OPTIONS)
