import itertools

import numpy as np
import pytest
from scripts.data.geometry import GridGeometry
from scripts.evaluation.metrics import (
    box_normalize,
    chamfer_distance,
    chamfer_matrix,
    compare_distributions,
    dice_iou,
    emd,
    emd_lower_bounds,
    emd_matrix,
    emd_set_blocks,
    mmd_cov,
    nn_distances_nm,
    one_nna,
    psnr,
    set_metrics,
    subsample,
)
from scripts.evaluation.realism import classifier_two_sample_test, cloud_features, feature_columns, realism_by_statistic
from scripts.simulate_smlm import simulate_microtubules


def blobs(n_clouds, rng, n_points=64, shift=0.0):
    """Clouds drawn from one distribution: Gaussian blobs of random centre and width (plus ``shift`` in x)."""
    clouds = []
    for _ in range(n_clouds):
        centre, width = rng.uniform(-1, 1, 3), rng.uniform(0.05, 0.3)
        clouds.append(centre + width * rng.standard_normal((n_points, 3)) + [shift, 0, 0])
    return clouds


def metrics_of(generated, reference):
    return set_metrics(chamfer_matrix(generated), chamfer_matrix(reference), chamfer_matrix(generated, reference))


def brute_chamfer(a, b):
    d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return d.min(axis=1).mean() + d.min(axis=0).mean()


def test_chamfer_matches_brute_force_and_is_squared():
    rng = np.random.default_rng(0)
    a, b, c = rng.random((30, 3)), rng.random((17, 3)), rng.random((5, 3))
    assert chamfer_distance(a, b) == pytest.approx(brute_chamfer(a, b), rel=1e-12)
    # one point each, 2 apart: squared distances, so 4 + 4
    assert chamfer_distance([[0.0, 0, 0]], [[2.0, 0, 0]]) == pytest.approx(8.0)
    clouds = [a, b, c]
    expected = np.array([[brute_chamfer(x, y) for y in clouds] for x in clouds])
    np.testing.assert_allclose(chamfer_matrix(clouds), expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(chamfer_matrix(clouds, clouds[:2]), expected[:, :2], rtol=1e-12, atol=1e-15)
    assert np.all(np.diag(chamfer_matrix(clouds)) == 0)


def test_emd_matches_a_permutation_search():
    rng = np.random.default_rng(1)
    for _ in range(5):
        a, b = rng.random((6, 3)), rng.random((6, 3))
        d = np.linalg.norm(a[:, None] - b[None], axis=-1)
        best = min(d[np.arange(6), list(p)].mean() for p in itertools.permutations(range(6)))
        assert emd(a, b) == pytest.approx(best, rel=1e-12)
    clouds = [rng.random((6, 3)) for _ in range(3)]
    full = emd_matrix(clouds)
    np.testing.assert_allclose(full, full.T)
    np.testing.assert_allclose(emd_matrix(clouds, clouds[1:]), full[:, 1:], atol=1e-12)
    with pytest.raises(ValueError, match="same number of points"):
        emd(clouds[0], clouds[1][:5])


def test_pruned_emd_blocks_give_the_metrics_of_the_full_matrix():
    rng = np.random.default_rng(8)
    for generated, reference in [
        (blobs(12, rng, 24), blobs(15, rng, 24)),
        (blobs(6, rng, 24, shift=0.3), blobs(15, rng, 24)),
        (blobs(15, rng, 24), blobs(4, rng, 24)),
    ]:
        full = emd_matrix(generated + reference)
        n = len(generated)
        expected = set_metrics(full[:n, :n], full[n:, n:], full[:n, n:])
        lower = emd_lower_bounds(generated + reference)
        assert np.all(lower <= full + 1e-12)
        cache = {}
        *blocks, n_exact = emd_set_blocks(generated, reference, reference_cache=cache)
        assert set_metrics(*blocks) == expected  # bit for bit
        assert 0 < n_exact < len(full) * (len(full) - 1) // 2
        *again, n_again = emd_set_blocks(generated, reference, reference_cache=cache)  # reference pairs are cached
        assert set_metrics(*again) == expected and n_again == n_exact - len(cache)


def test_two_draws_of_one_distribution_give_1nna_near_half():
    rng = np.random.default_rng(2)
    result = metrics_of(blobs(60, rng), blobs(60, rng))
    assert 0.38 <= result["1nna"] <= 0.62, result
    assert result["cov"] > 0.4


def test_unequal_sizes_of_one_distribution_give_1nna_near_half():
    rng = np.random.default_rng(3)
    result = metrics_of(blobs(20, rng), blobs(80, rng))
    assert 0.35 <= result["1nna"] <= 0.65, result


def test_copies_of_the_reference_give_1nna_zero_cov_one_mmd_zero():
    reference = blobs(30, np.random.default_rng(4))
    copies = [c.copy() for c in reference]
    result = metrics_of(copies, reference)
    assert result["1nna"] == 0.0 and result["1nna_generated"] == 0.0 and result["1nna_reference"] == 0.0
    assert result["cov"] == 1.0
    assert result["mmd"] == 0.0


def test_a_shifted_copy_gives_1nna_one():
    reference = blobs(30, np.random.default_rng(5))
    shifted = [c + [5.0, 0, 0] for c in reference]
    assert metrics_of(shifted, reference)["1nna"] == 1.0


def test_mmd_of_a_set_with_itself_is_zero():
    clouds = blobs(10, np.random.default_rng(6))
    assert mmd_cov(chamfer_matrix(clouds, clouds))["mmd"] == 0.0


def test_mmd_cov_and_1nna_on_a_hand_made_matrix():
    # generated 0 and 1 are both nearest to reference 1; reference 0 and 2 are covered by nobody
    d_gen_ref = np.array([[3.0, 1.0, 5.0], [4.0, 2.0, 6.0]])
    assert mmd_cov(d_gen_ref) == {"mmd": pytest.approx((3 + 1 + 5) / 3), "cov": pytest.approx(1 / 3)}
    d_gen_gen = np.array([[0.0, 0.5], [0.5, 0.0]])  # the generated pair is closer to each other: both right
    d_ref_ref = np.array([[0.0, 9.0, 9.0], [9.0, 0.0, 9.0], [9.0, 9.0, 0.0]])  # each reference nearest a generated
    result = one_nna(d_gen_gen, d_ref_ref, d_gen_ref)
    assert result == {"1nna": 0.5, "1nna_generated": 1.0, "1nna_reference": 0.0}


def test_subsample_and_box_normalize():
    points = np.arange(30.0).reshape(10, 3)
    a, b = subsample(points, 4, rng=0), subsample(points, 4, rng=0)
    assert a.shape == (4, 3) and np.array_equal(a, b) and len(np.unique(a[:, 0])) == 4
    assert subsample(points, 25, rng=1).shape == (25, 3)  # a smaller cloud is drawn with replacement
    box = GridGeometry((-100.0, 1000.0, -300.0), (3900.0, 3000.0, 300.0), (8, 8, 4))
    corners = box_normalize([box.box_min_nm, box.box_max_nm], box)
    np.testing.assert_allclose(corners, [[-0.5, -0.25, -0.075], [0.5, 0.25, 0.075]])


def test_grid_metrics():
    target = np.zeros((4, 4, 4), np.float32)
    target[:2] = 1.0
    prediction = np.zeros_like(target)
    prediction[1:3] = 0.8
    assert dice_iou(prediction, target, 0.5) == {"dice": pytest.approx(0.5), "iou": pytest.approx(1 / 3)}
    assert dice_iou(np.zeros(3), np.zeros(3), 0.1) == {"dice": 1.0, "iou": 1.0}
    assert psnr(target * 0.9, target) == pytest.approx(10 * np.log10(1 / (0.01 * 0.5)))
    assert psnr(target, target) == float("inf")


def test_nn_distances_and_distribution_distance():
    lattice = 10.0 * np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
    np.testing.assert_allclose(nn_distances_nm(lattice), 10.0)
    values = np.random.default_rng(7).normal(size=1000)
    result = compare_distributions(values + 3.0, values)
    assert result["wasserstein"] == pytest.approx(3.0)
    assert result["mean"] - result["reference_mean"] == pytest.approx(3.0)
    assert compare_distributions([], values)["wasserstein"] is None


def test_local_shape_of_a_line_a_sheet_and_a_blob():
    from scripts.evaluation.metrics import local_shape

    rng = np.random.default_rng(0)
    line = np.c_[rng.uniform(0, 4000, 3000), rng.normal(0, 5, 3000), rng.normal(0, 5, 3000)]
    sheet = np.c_[rng.uniform(0, 2000, 3000), rng.uniform(0, 2000, 3000), rng.normal(0, 3, 3000)]
    blob = rng.normal(0, 60, (3000, 3))
    lin, pla = local_shape(line, 150)
    assert lin.mean() > 0.95 and pla.mean() < 0.05
    lin, pla = local_shape(sheet, 150)
    assert pla.mean() > 0.6 and lin.mean() < 0.35  # a finite sample of a disc is a little elongated
    lin, pla = local_shape(blob, 150)
    assert lin.mean() < 0.3 and pla.mean() < 0.3
    # isolated points (fewer than min_neighbours within the radius) are left out
    assert len(local_shape(np.array([[0, 0, 0], [1000, 0, 0], [0, 1000, 0]], float), 150, min_neighbours=2)[0]) == 0


def test_cross_section_reads_a_filaments_width_and_the_tilt_of_its_narrowest_axis():
    from scripts.evaluation.metrics import local_geometry

    rng = np.random.default_rng(1)
    n = 4000
    # a filament along x imaged as SMLM is: 12 nm across in y, 40 nm in z; its narrowest axis is y
    across = np.c_[rng.normal(0, 12, n), rng.normal(0, 40, n)]

    def filament(cross_section, degrees=0.0):  # the cross-section turned about the filament's axis
        a = np.radians(degrees)
        turned = cross_section @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
        return np.c_[rng.uniform(0, 4000, n), turned]

    upright = local_geometry(filament(across), 150, rng=0)
    assert np.mean(upright["cross_section_nm"]) == pytest.approx(12, rel=0.1)
    assert np.mean(upright["narrow_axis_z"]) < 0.1
    tilted = local_geometry(filament(across, 60), 150, rng=0)
    assert np.mean(tilted["cross_section_nm"]) == pytest.approx(12, rel=0.1)  # as wide, turned by 60°
    assert np.mean(tilted["narrow_axis_z"]) == pytest.approx(np.sin(np.radians(60)), abs=0.05)
    wider = local_geometry(filament(across * [2, 1]), 150, rng=0)  # 24 nm across, still narrower than in z
    assert np.mean(wider["cross_section_nm"]) == pytest.approx(24, rel=0.1)


def test_pair_distances_and_ripley_l_on_known_clouds():
    from scripts.evaluation.metrics import pair_distances, ripley_l

    pts = np.array([[0, 0, 0], [10, 0, 0], [100, 0, 0], [700, 0, 0]], float)
    np.testing.assert_allclose(np.sort(pair_distances(pts, 20, 650)), [90, 100, 600])
    rng = np.random.default_rng(1)
    uniform = rng.uniform(0, 2000, (4000, 3))
    radii = np.array([50.0, 100.0])
    l_uniform = ripley_l(uniform, radii, 2000.0**3, num_points=4000)
    np.testing.assert_allclose(l_uniform, radii, rtol=0.08)  # L(r) = r for complete spatial randomness (edges aside)
    clustered = np.concatenate([rng.normal(c, 20, (400, 3)) for c in rng.uniform(200, 1800, (10, 3))])
    assert np.all(ripley_l(clustered, radii, 2000.0**3, num_points=4000) > 2 * radii)


def test_histogram_w1_matches_scipy():
    from scipy.stats import wasserstein_distance
    from scripts.evaluation.metrics import histogram_w1

    rng = np.random.default_rng(2)
    a, b = rng.gamma(3, 8, 20000), rng.gamma(3, 9, 15000)
    edges = np.linspace(0, 500, 2001)
    w1 = histogram_w1(np.histogram(a, edges)[0], np.histogram(b, edges)[0], edges[1] - edges[0])
    assert abs(w1 - wasserstein_distance(a, b)) < 0.125  # half a bin


@pytest.fixture(scope="module")
def filament_features():
    """Statistic vectors of 100 simulated microtubule clouds, and of as many uniform hazes of the same point counts in
    the same box."""
    clouds = simulate_microtubules(100, seed=3, mean_points=3000)
    rng = np.random.default_rng(0)
    haze = [rng.uniform((0.0, 0.0, -300.0), (5000.0, 5000.0, 300.0), (len(c), 3)) for c in clouds]
    features = [np.stack([cloud_features(c, rng=i) for i, c in enumerate(s)]) for s in (clouds, haze)]
    return features


def test_realism_of_two_halves_of_one_set_is_chance(filament_features):
    clouds, _ = filament_features
    result = classifier_two_sample_test(clouds[:50], clouds[50:], folds=5, seed=0)
    assert result["n"] == 50 and result["folds"] == 5
    assert 0.3 <= result["accuracy"] <= 0.7, result
    assert 0 < result["stderr"] < 0.15
    # seeded: the same call gives the same folds and accuracy
    assert classifier_two_sample_test(clouds[:50], clouds[50:], folds=5, seed=0) == result


def test_realism_of_haze_against_filaments_is_near_one(filament_features):
    clouds, haze = filament_features
    result = classifier_two_sample_test(haze[:50], clouds[50:], folds=5, seed=0)
    assert result["accuracy"] >= 0.9, result


def test_realism_by_statistic_names_the_statistic_that_differs():
    """The same filaments lifted by 150 nm differ only in z: z alone tells them apart, every other statistic (which
    a translation leaves as it is) is at chance."""
    clouds = simulate_microtubules(80, seed=4, mean_points=2000)
    lifted = [
        np.stack([cloud_features(c + [0.0, 0.0, dz], rng=i) for i, c in enumerate(clouds[40:])]) for dz in (0, 150)
    ]
    own = np.stack([cloud_features(c, rng=i) for i, c in enumerate(clouds[:40])])
    columns = feature_columns()
    assert sorted(i for cols in columns.values() for i in cols) == list(range(own.shape[1]))  # each column once
    same, moved = (realism_by_statistic(x, own, folds=5, seed=0) for x in lifted)
    assert set(moved) == {"point_count", "z_nm", "nn_distance_nm", "linearity", "planarity", "pair_distance_nm"}
    assert moved["z_nm"] >= 0.95 and same["z_nm"] <= 0.75, (moved, same)
    for name in moved.keys() - {"z_nm"}:
        assert moved[name] == same[name] <= 0.75, (name, moved, same)
    with pytest.raises(ValueError, match="expected 32 feature columns"):
        realism_by_statistic(own[:, :-1], own)


def test_realism_balances_sets_and_refuses_bad_folds(filament_features):
    clouds, haze = filament_features
    result = classifier_two_sample_test(haze[:7], clouds, folds=5, seed=1)  # the larger set is subsampled to 7
    assert result["n"] == 7 and result["folds"] == 5 and result["accuracy"] >= 0.9
    assert classifier_two_sample_test(haze[:3], clouds, folds=5)["folds"] == 3  # at most one cloud per fold
    assert classifier_two_sample_test(haze[:1], clouds)["accuracy"] is None
    with pytest.raises(ValueError, match="folds must be an integer >= 2, got 1"):
        classifier_two_sample_test(haze, clouds, folds=1)
