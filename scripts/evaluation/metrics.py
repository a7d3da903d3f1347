"""Metrics of generated point clouds and grids against real ones. Pure functions over arrays.

Point-cloud sets are compared as in PointFlow (Yang et al. 2019), PVD and LION: every cloud is subsampled to a
fixed count and normalised by the training box, a pairwise distance matrix is computed under Chamfer distance
(CD) or Earth mover's distance (EMD), and MMD, COV and 1-NNA are read off the matrices.

- Chamfer distance: the sum of the two mean **squared** nearest-neighbour distances (the papers' definition;
  libraries that return unsquared means are not comparable). Nearest neighbours come from one
  ``scipy.spatial.cKDTree`` per cloud, built once and queried with all other clouds' points at once.
- EMD: the mean Euclidean distance between matched points under the optimal one-to-one assignment
  (``scipy.optimize.linear_sum_assignment``, exact), on equal-size clouds; exact EMD is cubic in the point count,
  so it is computed on small subsamples (e.g. 512 points) and reported under that name (``emd512``). On 512-point
  subsamples of simulated microtubules one assignment takes ~50 ms on one core here (clustered points make it
  several times slower than on uniform ones), so :func:`emd_set_blocks` solves only the pairs that MMD, COV and
  1-NNA read, found through cheap lower bounds (``benchmarks/benchmark_metrics.py``: 4.3× fewer seconds at 20 vs
  20 clouds, the same metrics to the bit).
- Normalisation (:func:`box_normalize`): points minus the box centre, divided by the box's largest extent. The
  box keeps its aspect ratio (SMLM boxes are flat: mapping each axis to [0, 1] would stretch z several-fold);
  coordinates lie in [-0.5, 0.5] along the longest axis.
- Realism: :mod:`scripts.evaluation.realism` (a classifier two-sample test over these statistics).
"""

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist
from scipy.stats import wasserstein_distance


def subsample(points, num_points, rng=None):
    """``num_points`` rows of an (M, 3) cloud drawn at random: without replacement when ``M >= num_points``,
    with replacement (some points repeated) when the cloud is smaller. ``rng``: a Generator or a seed."""
    points = np.asarray(points, np.float64)
    if len(points) == 0:
        raise ValueError("subsample: the cloud is empty")
    rng = np.random.default_rng(rng)
    return points[rng.choice(len(points), size=int(num_points), replace=len(points) < num_points)]


def box_normalize(points, geometry):
    """Points (nm) centred on ``geometry``'s box and divided by its largest extent (the unit of the metrics)."""
    centre = (np.asarray(geometry.box_min_nm) + np.asarray(geometry.box_max_nm)) / 2
    return (np.asarray(points, np.float64) - centre) / float(geometry.size_nm.max())


def _trees(clouds):
    return [cKDTree(c) for c in clouds]


def _directed(query_clouds, trees, workers, power=2):
    """``out[i, j]``: mean over the points of ``query_clouds[i]`` of the distance (to ``power``) to the nearest point
    of ``trees[j]``; each tree is queried once, with every query cloud's points stacked."""
    counts = np.array([len(c) for c in query_clouds])
    stacked, starts = np.concatenate(query_clouds), np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.empty((len(query_clouds), len(trees)))
    for j, tree in enumerate(trees):
        d, _ = tree.query(stacked, k=1, workers=workers)
        out[:, j] = np.add.reduceat(d**power, starts) / counts
    return out


def chamfer_distance(a, b):
    """Chamfer distance between two (M, 3) clouds: mean squared NN distance a→b plus b→a."""
    return float(chamfer_matrix([a], [b])[0, 0])


def chamfer_matrix(clouds_a, clouds_b=None, workers=1):
    """Pairwise Chamfer distances, ``(len(clouds_a), len(clouds_b))``; with ``clouds_b=None`` the symmetric matrix
    of ``clouds_a`` with itself (zero diagonal). ``workers``: threads per KD-tree query (-1: all cores)."""
    clouds_a = [np.asarray(c, np.float64) for c in clouds_a]
    if clouds_b is None:
        d = _directed(clouds_a, _trees(clouds_a), workers)
        d = d + d.T
        np.fill_diagonal(d, 0.0)
        return d
    clouds_b = [np.asarray(c, np.float64) for c in clouds_b]
    return _directed(clouds_a, _trees(clouds_b), workers) + _directed(clouds_b, _trees(clouds_a), workers).T


def emd(a, b):
    """Exact Earth mover's distance between two clouds of equal size: the mean Euclidean distance between matched
    points under the optimal one-to-one assignment."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"emd: the clouds must have the same number of points, got {a.shape} and {b.shape}")
    cost = cdist(a, b)
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def emd_matrix(clouds_a, clouds_b=None):
    """Pairwise :func:`emd`, ``(len(clouds_a), len(clouds_b))``; ``clouds_b=None``: symmetric, zero diagonal."""
    if clouds_b is None:
        n = len(clouds_a)
        d = np.zeros((n, n))
        for i in range(n):
            for j in range(i + 1, n):
                d[i, j] = d[j, i] = emd(clouds_a[i], clouds_a[j])
        return d
    return np.array([[emd(a, b) for b in clouds_b] for a in clouds_a]).reshape(len(clouds_a), len(clouds_b))


def directions(n):
    """``n`` >= 3 unit vectors: the three axes, then a Fibonacci lattice over the upper hemisphere."""
    i = np.arange(n - 3) + 0.5
    z, phi = i / max(n - 3, 1), np.pi * (1 + 5**0.5) * i
    lattice = np.stack([np.sqrt(1 - z**2) * np.cos(phi), np.sqrt(1 - z**2) * np.sin(phi), z], axis=1)
    return np.vstack([np.eye(3), lattice])


def emd_lower_bounds(clouds, workers=1, n_directions=32):
    """A lower bound of :func:`emd` for every pair of equal-size ``clouds`` (symmetric, zero diagonal), the larger of:

    - nearest neighbours: a point's matched partner is at least as far as its nearest neighbour, so EMD is at least
      either direction's mean (unsquared) nearest-neighbour distance (KD-trees, as :func:`chamfer_matrix`);
    - projections: a distance is at least its projection on a unit vector, and in 1D the optimal matching pairs
      the sorted values, so EMD is at least the mean difference of the sorted projections, on each of
      ``n_directions`` directions (:func:`directions`).
    """
    clouds = [np.asarray(c, np.float64) for c in clouds]
    nearest = _directed(clouds, _trees(clouds), workers, power=1)
    projected = np.sort(np.stack(clouds) @ directions(n_directions).T, axis=1)  # (clouds, points, directions)
    sliced = np.stack([np.abs(p - projected).mean(axis=1).max(axis=1) for p in projected])
    d = np.maximum(np.maximum(nearest, nearest.T), sliced)
    np.fill_diagonal(d, 0.0)
    return d


def emd_set_blocks(generated, reference, workers=1, reference_cache=None):
    """The three blocks ``(d_gen_gen, d_ref_ref, d_gen_ref)`` of the union's EMD matrix that :func:`set_metrics`
    needs, with exact EMD only where MMD, COV and 1-NNA read it.

    Those metrics only read nearest neighbours: each cloud's nearest other cloud, each generated cloud's nearest
    reference cloud and each reference cloud's nearest generated cloud. Each is found exactly by trying candidates
    in increasing order of :func:`emd_lower_bounds` until the bound exceeds the best EMD found; the entries never
    computed hold their lower bound, larger than the minimum of their row, so every minimum and arg-minimum equals
    that of the full matrix. ``reference_cache``: a dict that keeps reference-to-reference EMDs between calls.

    Returns ``(d_gen_gen, d_ref_ref, d_gen_ref, n_exact)``, ``n_exact`` the number of pairs solved exactly.
    """
    clouds, n_gen = list(generated) + list(reference), len(generated)
    n = len(clouds)
    lower = emd_lower_bounds(clouds, workers)
    d, known = lower.copy(), np.eye(n, dtype=bool)
    cache = {} if reference_cache is None else reference_cache
    n_exact = 0

    def exact(u, v):
        nonlocal n_exact
        if not known[u, v]:
            key = (min(u, v) - n_gen, max(u, v) - n_gen) if min(u, v) >= n_gen else None
            if key is not None and key in cache:
                value = cache[key]
            else:
                value, n_exact = emd(clouds[min(u, v)], clouds[max(u, v)]), n_exact + 1  # as emd_matrix
                if key is not None:
                    cache[key] = value
            d[u, v] = d[v, u] = value
            known[u, v] = known[v, u] = True
        return d[u, v]

    everyone, gen, ref = np.arange(n), np.arange(n_gen), np.arange(n_gen, n)
    for u in range(n):
        for candidates in (everyone[everyone != u], ref if u < n_gen else gen):
            best = np.inf
            for v in candidates[np.argsort(lower[u, candidates], kind="stable")]:
                if lower[u, v] * (1 - 1e-9) > best:  # the slack keeps rounding from pruning a tie
                    break
                best = min(best, exact(u, v))
    return d[:n_gen, :n_gen], d[n_gen:, n_gen:], d[:n_gen, n_gen:], n_exact


def mmd_cov(d_gen_ref):
    """MMD and COV from ``d_gen_ref[i, j]``, the distance between generated cloud i and reference cloud j.

    MMD: mean over reference clouds of the distance to the closest generated one. COV: fraction of reference
    clouds that are the nearest neighbour of at least one generated cloud (at most n_generated / n_reference).
    """
    d = np.asarray(d_gen_ref)
    return {"mmd": float(d.min(axis=0).mean()), "cov": float(len(np.unique(d.argmin(axis=1))) / d.shape[1])}


def one_nna(d_gen_gen, d_ref_ref, d_gen_ref):
    """Leave-one-out 1-nearest-neighbour accuracy of telling generated from reference clouds in their union.

    Each cloud is classified by its nearest other cloud; itself is left out by index, so an exact duplicate in
    the other set (memorisation) is its nearest neighbour and the cloud counts as misclassified. Returned:
    ``1nna``, the mean of the accuracies on the generated (``1nna_generated``) and on the reference clouds
    (``1nna_reference``). With equal set sizes this is PointFlow's 1-NNA; with unequal sizes it stays 50 % for
    indistinguishable sets (the pooled accuracy would not). 50 %: ideal; 100 %: every cloud is told apart;
    below 50 %: generated clouds sit closer to reference clouds than these do to each other (copies).
    """
    n_gen, n_ref = len(d_gen_gen), len(d_ref_ref)
    full = np.block([[np.asarray(d_gen_gen), np.asarray(d_gen_ref)], [np.asarray(d_gen_ref).T, d_ref_ref]])
    np.fill_diagonal(full, np.inf)
    is_ref = np.arange(n_gen + n_ref) >= n_gen
    correct = is_ref[full.argmin(axis=1)] == is_ref
    acc_gen, acc_ref = float(correct[:n_gen].mean()), float(correct[n_gen:].mean())
    return {"1nna": (acc_gen + acc_ref) / 2, "1nna_generated": acc_gen, "1nna_reference": acc_ref}


def set_metrics(d_gen_gen, d_ref_ref, d_gen_ref):
    """MMD, COV and 1-NNA (see :func:`mmd_cov`, :func:`one_nna`) from the three blocks of the distance matrix."""
    return {**mmd_cov(d_gen_ref), **one_nna(d_gen_gen, d_ref_ref, d_gen_ref)}


def dice_iou(prediction, target, threshold):
    """Dice and IoU of the foregrounds ``> threshold`` of two grids (both 1.0 when both foregrounds are empty)."""
    p, t = np.asarray(prediction) > threshold, np.asarray(target) > threshold
    overlap, total, union = np.logical_and(p, t).sum(), p.sum() + t.sum(), np.logical_or(p, t).sum()
    return {"dice": float(2 * overlap / total) if total else 1.0, "iou": float(overlap / union) if union else 1.0}


def psnr(prediction, target, data_range=1.0):
    """Peak signal-to-noise ratio in dB of ``prediction`` against ``target`` (values spanning ``data_range``)."""
    mse = float(np.mean((np.asarray(prediction, np.float64) - np.asarray(target, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def nn_distances_nm(points):
    """Distance from each localization to its nearest other localization (nm; 0 for repeated points)."""
    points = np.asarray(points, np.float64)
    if len(points) < 2:
        return np.zeros(0)
    d, _ = cKDTree(points).query(points, k=2)
    return d[:, 1]


def compare_distributions(values, reference):
    """Mean ± std of ``values`` and of ``reference`` and the 1D Wasserstein distance between them (their unit)."""
    values, reference = np.asarray(values, np.float64).ravel(), np.asarray(reference, np.float64).ravel()
    out = {"mean": _stat(values, np.mean), "std": _stat(values, np.std)}
    out.update(reference_mean=_stat(reference, np.mean), reference_std=_stat(reference, np.std))
    out["wasserstein"] = float(wasserstein_distance(values, reference)) if len(values) and len(reference) else None
    return out


def foreground_statistics(grids, real_grids, threshold):
    """:func:`compare_distributions` of the grids' foreground fractions (values above ``threshold``) and of their
    foreground intensities, against those of ``real_grids``."""
    fraction = [float(np.mean(g > threshold)) for g in grids]
    real_fraction = [float(np.mean(g > threshold)) for g in real_grids]
    intensity = np.concatenate([g[g > threshold] for g in grids])
    real_intensity = np.concatenate([g[g > threshold] for g in real_grids])
    return {
        "foreground_fraction": compare_distributions(fraction, real_fraction),
        "foreground_intensity": compare_distributions(intensity, real_intensity),
    }


def _stat(values, func):
    return float(func(values)) if len(values) else None


def histogram_w1(counts_a, counts_b, bin_width):
    """1D Wasserstein distance between two distributions given as histograms on the same bins (``bin_width``):
    the area between their cumulative distributions; exact to half a bin."""
    a, b = np.asarray(counts_a, np.float64), np.asarray(counts_b, np.float64)
    if a.sum() == 0 or b.sum() == 0:
        return float("nan")
    return float(np.abs(np.cumsum(a) / a.sum() - np.cumsum(b) / b.sum()).sum() * bin_width)


def local_geometry(points, radius_nm=150.0, num_queries=512, min_neighbours=5, rng=None):
    """The shape of a cloud around each of ``num_queries`` random points (all points if fewer).

    The eigenvalues l1 >= l2 >= l3 of the covariance of every point within ``radius_nm`` of a query point (itself
    included) give ``linearity = (l1 - l2) / l1`` and ``planarity = (l2 - l3) / l1``: about 1 and 0 on a thin
    filament, 0 and 1 on a sheet, both low on haze. The narrowest axis (l3's) gives the structure's local width,
    ``cross_section_nm = sqrt(l3)`` (on a filament: its spread across, tube and localization precision together),
    and ``narrow_axis_z``, the absolute z component of that axis: near 0 where the narrowest direction lies in the
    xy plane, as on filaments imaged with a poorer axial than lateral precision, 1 where it is z. Query points with
    fewer than ``min_neighbours`` neighbours (isolated background) are left out. Returns a dict of four arrays of
    equal length, by those names.
    """
    points = np.asarray(points, np.float64)
    names = ("linearity", "planarity", "cross_section_nm", "narrow_axis_z")
    if len(points) < min_neighbours:
        return {name: np.zeros(0) for name in names}
    rng = np.random.default_rng(rng)
    queries = points if len(points) <= num_queries else points[rng.choice(len(points), num_queries, replace=False)]
    tree = cKDTree(points)
    neighbours = tree.query_ball_point(queries, radius_nm, workers=1)
    counts = np.array([len(n) for n in neighbours])
    keep = counts >= min_neighbours
    if not keep.any():
        return {name: np.zeros(0) for name in names}
    owner = np.repeat(np.arange(len(queries))[keep], counts[keep])
    members = points[np.concatenate([neighbours[i] for i in np.flatnonzero(keep)])]
    n = counts[keep].astype(np.float64)
    index = np.searchsorted(np.flatnonzero(keep), owner)
    mean = np.stack([np.bincount(index, members[:, a], len(n)) for a in range(3)], axis=1) / n[:, None]
    centred = members - mean[index]
    cov = np.empty((len(n), 3, 3))
    for a in range(3):
        for b in range(a, 3):
            cov[:, a, b] = cov[:, b, a] = np.bincount(index, centred[:, a] * centred[:, b], len(n)) / n
    values, vectors = np.linalg.eigh(cov)
    l3, l2, l1 = np.moveaxis(values, -1, 0)
    l1 = np.maximum(l1, 1e-12)
    shape = ((l1 - l2) / l1, (l2 - l3) / l1, np.sqrt(np.maximum(l3, 0.0)), np.abs(vectors[:, 2, 0]))
    return dict(zip(names, shape))


def local_shape(points, radius_nm=150.0, num_queries=512, min_neighbours=5, rng=None):
    """``(linearity, planarity)`` of :func:`local_geometry`, two arrays of equal length."""
    shape = local_geometry(points, radius_nm, num_queries, min_neighbours, rng)
    return shape["linearity"], shape["planarity"]


def pair_distances(points, r_min_nm=20.0, r_max_nm=500.0, num_points=1000, rng=None):
    """Distances between every two of ``num_points`` random points of a cloud (all if fewer) that lie between
    ``r_min_nm`` and ``r_max_nm`` apart: the pair statistic behind Ripley's K and the pair-correlation function."""
    points = np.asarray(points, np.float64)
    rng = np.random.default_rng(rng)
    if len(points) > num_points:
        points = points[rng.choice(len(points), num_points, replace=False)]
    if len(points) < 2:
        return np.zeros(0)
    pairs = cKDTree(points).query_pairs(r_max_nm, output_type="ndarray")
    d = np.linalg.norm(points[pairs[:, 0]] - points[pairs[:, 1]], axis=1)
    return d[d >= r_min_nm]


def ripley_l(points, radii_nm, volume_nm3, num_points=1000, rng=None):
    """Ripley's L(r) in 3D, ``(3 K(r) / 4π)^(1/3)`` with ``K(r) = V · 2·pairs(d < r) / (n (n - 1))``, of ``num_points``
    random points (no edge correction: compare clouds in the same box). L(r) = r for complete spatial randomness,
    above it for clustered points."""
    points = np.asarray(points, np.float64)
    rng = np.random.default_rng(rng)
    if len(points) > num_points:
        points = points[rng.choice(len(points), num_points, replace=False)]
    n = len(points)
    radii = np.asarray(radii_nm, np.float64)
    if n < 2:
        return np.full(len(radii), np.nan)
    pairs = cKDTree(points).query_pairs(radii.max(), output_type="ndarray")
    d = np.sort(np.linalg.norm(points[pairs[:, 0]] - points[pairs[:, 1]], axis=1))
    k = volume_nm3 * 2.0 * np.searchsorted(d, radii, side="left") / (n * (n - 1))
    return np.cbrt(3.0 * k / (4.0 * np.pi))
