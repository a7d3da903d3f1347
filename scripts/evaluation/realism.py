"""The realism test: a classifier two-sample test of generated clouds against real ones.

:func:`classifier_two_sample_test` gives the cross-validated accuracy of a logistic regression that tells two sets
of clouds apart by their statistics (:func:`cloud_features`: point count, NN distances, z spread, local linearity
and planarity, pair distances); 50 %: they cannot be told apart, 100 %: always. On 100 simulated microtubule clouds
(``tests/test_metrics.py``), two halves of the set scored 60 % and uniform haze of the same point counts against
half of them 100 %.
"""

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from scripts.evaluation.metrics import local_geometry, nn_distances_nm, pair_distances

_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def _quantiles(values):
    return np.quantile(values, _QUANTILES) if len(values) else np.zeros(len(_QUANTILES))


def statistic_features(n_points, nn_nm, z_nm, linearity, planarity, pairs_nm, pair_range_nm, pair_bins=8):
    """One cloud's statistics as a feature vector: log point count; quantiles (10, 25, 50, 75, 90 %) of the
    nearest-neighbour distances (nm), of z (nm, with its standard deviation), of the local linearity and planarity
    (with their means); and the normalised histogram of the pair distances on ``pair_bins`` bins of
    ``pair_range_nm``. Statistics with no values (a one-point cloud) give zeros. :func:`feature_columns` says which
    columns belong to which statistic."""
    parts = _feature_parts(n_points, nn_nm, z_nm, linearity, planarity, pairs_nm, pair_range_nm, pair_bins)
    return np.concatenate([values for _, values in parts])


def _feature_parts(n_points, nn_nm, z_nm, linearity, planarity, pairs_nm, pair_range_nm, pair_bins):
    """:func:`statistic_features`' vector in parts, ``(statistic, values)``, in its order."""
    shape = [np.r_[np.mean(v) if len(v) else 0.0, _quantiles(v)] for v in (linearity, planarity)]
    hist = np.histogram(pairs_nm, np.linspace(*pair_range_nm, pair_bins + 1))[0].astype(np.float64)
    return [
        ("point_count", np.r_[np.log1p(n_points)]),
        ("z_nm", np.r_[np.std(z_nm) if len(z_nm) else 0.0]),
        ("nn_distance_nm", _quantiles(nn_nm)),
        ("z_nm", _quantiles(z_nm)),
        ("linearity", shape[0]),
        ("planarity", shape[1]),
        ("pair_distance_nm", hist / max(hist.sum(), 1.0)),
    ]


def feature_columns(pair_bins=8):
    """``{statistic: column indices}`` of :func:`statistic_features`' vector (``point_count`` and the names of
    :data:`FEATURES`)."""
    columns, start = {}, 0
    for name, values in _feature_parts(1, [], [], [], [], [], (0.0, 1.0), pair_bins):
        columns.setdefault(name, []).extend(range(start, start + len(values)))
        start += len(values)
    return columns


STATISTICS = (
    "nn_distance_nm",
    "z_nm",
    "linearity",
    "planarity",
    "pair_distance_nm",
    "cross_section_nm",
    "narrow_axis_z",
)
FEATURES = STATISTICS[:5]  # what the realism test reads, in :func:`statistic_features`' order


def cloud_statistics(points, radius_nm=150.0, pair_range_nm=(20.0, 500.0), rng=None):
    """What a microscopist reads off a cloud (nm), by the names of :data:`STATISTICS`: its nearest-neighbour
    distances, z, :func:`local_geometry` within ``radius_nm`` (linearity, planarity, the width across and the tilt
    of the narrowest axis) and :func:`pair_distances` in ``pair_range_nm``."""
    shape = local_geometry(points, radius_nm, rng=rng)
    pairs = pair_distances(points, *pair_range_nm, rng=rng)
    return {"nn_distance_nm": nn_distances_nm(points), "z_nm": points[:, 2], **shape, "pair_distance_nm": pairs}


def cloud_features(points, radius_nm=150.0, pair_range_nm=(20.0, 500.0), rng=None):
    """:func:`statistic_features` of a cloud's :func:`cloud_statistics`. ``rng``: a Generator or a seed."""
    points = np.asarray(points, np.float64)
    stats = cloud_statistics(points, radius_nm, pair_range_nm, np.random.default_rng(rng))
    return statistic_features(len(points), *(stats[k] for k in FEATURES), pair_range_nm)


def set_statistics(clouds, radius_nm, pair_range_nm, rng):
    """The :func:`cloud_statistics` of ``clouds`` pooled over them, and each cloud's :func:`statistic_features`
    (one row per cloud, for :func:`classifier_two_sample_test`)."""
    stats, features = {key: [] for key in STATISTICS}, []
    for cloud in clouds:
        one = cloud_statistics(cloud, radius_nm, pair_range_nm, rng)
        for key, values in one.items():
            stats[key].append(values)
        features.append(statistic_features(len(cloud), *(one[k] for k in FEATURES), pair_range_nm))
    pooled = {key: np.concatenate(values) if values else np.zeros(0) for key, values in stats.items()}
    return pooled, np.array(features).reshape(len(features), -1)


def _logistic_fit(x, y, l2):
    """Weights (bias last) of the logistic regression minimising the mean log-loss + ``l2`` / 2 · |w|² (bias free)."""
    x1 = np.c_[x, np.ones(len(x))]
    penalty = np.r_[np.full(x.shape[1], l2), 0.0]

    def loss(w):
        z = x1 @ w
        value = np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(penalty * w**2)
        return value, x1.T @ (expit(z) - y) / len(y) + penalty * w

    return minimize(loss, np.zeros(x1.shape[1]), jac=True, method="L-BFGS-B", options={"gtol": 1e-8}).x


def classifier_two_sample_test(features_a, features_b, folds=5, seed=0, l2=0.1):
    """Classifier two-sample test (Lopez-Paz & Oquab, ICLR 2017): how well can a classifier tell set a from set b?

    The larger set is subsampled (seeded) to the size ``n`` of the smaller; the ``2n`` feature vectors (one row per
    cloud, e.g. :func:`cloud_features`) are split into ``folds`` stratified folds, and an L2-regularised logistic
    regression (``l2``: weight of the penalty on the standardised features) trained on all other folds, with the
    standardisation fitted on them, labels each held-out fold.

    Returns ``{"accuracy", "stderr", "n", "folds"}``: the held-out accuracy over all ``2n`` clouds (0.5: the sets
    cannot be told apart; 1.0: always told apart), its standard error over the folds, the clouds per set, and the
    folds used (at most ``n``); accuracy and stderr are ``None`` when a set has fewer than 2 clouds.
    """
    if isinstance(folds, bool) or int(folds) != folds or folds < 2:
        raise ValueError(f"classifier_two_sample_test: folds must be an integer >= 2, got {folds!r}")
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b))
    folds = min(int(folds), n)
    if n < 2:
        return {"accuracy": None, "stderr": None, "n": n, "folds": folds}
    a, b = (s[np.sort(rng.choice(len(s), n, replace=False))] for s in (a, b))
    x, y = np.concatenate([a, b]), np.r_[np.ones(n), np.zeros(n)]
    fold = np.empty(2 * n, int)
    for start in (0, n):  # stratified: each set's clouds dealt round the folds in a random order
        fold[start + rng.permutation(n)] = np.arange(n) % folds
    correct, accuracies = np.zeros(2 * n, bool), []
    for k in range(folds):
        train, test = fold != k, fold == k
        mean, std = x[train].mean(axis=0), x[train].std(axis=0)
        std[std == 0] = 1.0
        w = _logistic_fit((x[train] - mean) / std, y[train], l2)
        predicted = np.c_[(x[test] - mean) / std, np.ones(test.sum())] @ w > 0
        correct[test] = predicted == (y[test] == 1)
        accuracies.append(correct[test].mean())
    stderr = float(np.std(accuracies, ddof=1) / np.sqrt(folds))
    return {"accuracy": float(correct.mean()), "stderr": stderr, "n": n, "folds": folds}


def realism_by_statistic(features_a, features_b, folds=5, seed=0, pair_bins=8):
    """The realism test on each statistic alone: ``{statistic: accuracy}`` of :func:`classifier_two_sample_test` on
    the columns :func:`feature_columns` gives it. It says what gives a set away: a statistic near 50 % matches the
    other set's, one near 100 % tells the sets apart by itself."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    columns = feature_columns(pair_bins)
    width = sum(len(c) for c in columns.values())
    if a.shape[1:] != (width,) or b.shape[1:] != (width,):
        raise ValueError(f"realism_by_statistic: expected {width} feature columns, got {a.shape} and {b.shape}")
    return {
        name: classifier_two_sample_test(a[:, cols], b[:, cols], folds, seed)["accuracy"]
        for name, cols in columns.items()
    }
