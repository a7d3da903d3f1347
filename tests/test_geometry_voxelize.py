import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scripts.data.geometry import GridGeometry, as_shape
from scripts.data.voxelize import (
    as_training_grid,
    grid_mass_um3,
    grid_to_points,
    normalize_,
    point_count,
    sigma_in_voxels,
    voxelize,
)
from scripts.runtime.errors import UserError


def _cloud(n=5000, seed=0):
    """Absolute SMLM-like coordinates: x beyond 20 µm, z centred on 0 and negative."""
    rng = np.random.default_rng(seed)
    return rng.uniform([20000, -3000, -400], [26000, 1000, 300], size=(n, 3))


def test_voxel_centre_convention_and_affine_round_trip():
    geo = GridGeometry((-100.0, 0.0, 1000.0), (100.0, 50.0, 1300.0), (4, 5, 3))
    np.testing.assert_allclose(geo.spacing_nm, [50, 10, 100])
    np.testing.assert_allclose(geo.to_nm([0.5, 0.5, 0.5]), [-75, 5, 1050])  # min + (i + 0.5) * spacing
    np.testing.assert_array_equal(
        geo.voxel_index([[-100, 0, 1000], [99.9, 49.9, 1299.9], [100, 50, 1300]]), [[0, 0, 0], [3, 4, 2], [3, 4, 2]]
    )
    aff = geo.affine()
    np.testing.assert_allclose(aff[:3, 3], [-0.075, 0.005, 1.05])  # micrometres, voxel centre
    assert GridGeometry.from_affine(aff, geo.shape) == geo or np.allclose(
        GridGeometry.from_affine(aff, geo.shape).box_max_nm, geo.box_max_nm
    )
    assert GridGeometry.from_dict(geo.to_dict()) == geo


def test_box_from_data_padding_and_volume_dims():
    pts = _cloud()
    geo = GridGeometry.around([pts[:100], pts[100:]], 16, padding_nm=50)
    np.testing.assert_allclose(geo.box_min_nm, pts.min(axis=0) - 50)
    np.testing.assert_allclose(geo.box_max_nm, pts.max(axis=0) + 50)
    # the seed's box: anchored at zero, [-padding, volume_dims + padding] per axis
    geo = GridGeometry.around(pts, (32, 32, 8), padding_nm=100, volume_dims_nm=[8000, 8000, 1000])
    np.testing.assert_allclose(geo.box_min_nm, [-100, -100, -100])
    np.testing.assert_allclose(geo.box_max_nm, [8100, 8100, 1100])
    # or centred on the data, when asked
    geo = GridGeometry.around(pts, (32, 32, 8), volume_dims_nm=[8000, 8000, 1000], anchor="center")
    np.testing.assert_allclose(geo.size_nm, [8000, 8000, 1000])
    np.testing.assert_allclose((geo.lo + np.asarray(geo.box_max_nm)) / 2, (pts.min(0) + pts.max(0)) / 2)
    with pytest.raises(UserError, match="box_anchor: expected one of zero, center"):
        GridGeometry.around(pts, 8, volume_dims_nm=1000, anchor="middle")


@pytest.mark.parametrize("bad", [0, -3, 2.5, [16, 16], [16, 0, 16], "64", True])
def test_bad_voxel_size(bad):
    with pytest.raises(UserError, match="voxel_size"):
        as_shape(bad)


def test_density_conserves_mass_and_counts_points_outside():
    pts = _cloud()
    geo = GridGeometry.around(pts, (16, 12, 8))
    grid, outside = voxelize(pts, geo, "density")
    assert grid.dtype == np.float32 and grid.shape == (16, 12, 8)
    assert outside == 0 and grid.sum() == len(pts)
    small = GridGeometry(geo.box_min_nm, tuple(geo.lo + geo.size_nm / 2), (8, 6, 4))
    grid, outside = voxelize(pts, small, "density")
    assert outside == (~small.inside(pts)).sum() and grid.sum() + outside == len(pts)
    # dropped, not piled onto the faces: the last slab holds no more than its share
    assert grid[-1].sum() < 3 * grid[0].sum()


def test_occupancy_is_binary():
    pts = _cloud(200)
    grid, _ = voxelize(pts, GridGeometry.around(pts, 8), "occupancy")
    assert set(np.unique(grid)) == {0.0, 1.0}
    assert grid.sum() == len(np.unique(GridGeometry.around(pts, 8).voxel_index(pts), axis=0))


def test_gaussian_equals_dense_reference_and_sigma_widens():
    pts = _cloud(3000)
    geo = GridGeometry.around(pts, (24, 20, 12))
    hist, _ = voxelize(pts, geo, "density")
    for sigma in [0.5, 1.0, [1.0, 2.0, 0.7]]:
        grid, _ = voxelize(pts, geo, "gaussian", sigma)
        ref = gaussian_filter(hist.astype(np.float64), sigma, mode="constant", truncate=4.0)
        np.testing.assert_allclose(grid, ref, atol=1e-4)
    single = np.array([geo.to_nm([12.5, 10.5, 6.5])])
    narrow, _ = voxelize(single, geo, "gaussian", 0.7)
    wide, _ = voxelize(single, geo, "gaussian", 1.2)  # radius 5 voxels: stays inside
    assert narrow.max() > wide.max() and np.isclose(narrow.sum(), 1, atol=1e-5) and np.isclose(wide.sum(), 1)


def test_anisotropic_sigma_in_nm():
    geo = GridGeometry((0, 0, 0), (6400, 6400, 600), (64, 64, 12))  # 100 nm x/y, 50 nm z voxels
    sig = sigma_in_voxels(100.0, "nm", geo)
    np.testing.assert_allclose(sig, [1.0, 1.0, 2.0])
    grid, _ = voxelize(np.array([[3250.0, 3250.0, 325.0]]), geo, "gaussian", sig)
    profile_x, profile_z = grid[:, 32, 6], grid[32, 32, :]
    assert (profile_z > profile_x[32] * 0.5).sum() > (profile_x > profile_x[32] * 0.5).sum()
    with pytest.raises(UserError, match="sigma"):
        sigma_in_voxels(0, "voxel", geo)
    with pytest.raises(UserError, match="sigma"):
        sigma_in_voxels([1, -1, 1], "nm", geo)


def test_normalization_rules_record_their_constant():
    grid = np.array([0.0, 2.0, 8.0], np.float32)
    assert normalize_(grid, "max") == 8.0 and grid.max() == 1.0
    grid = np.array([0.0, 2.0, 8.0], np.float32)
    assert normalize_(grid, "percentile", 4.0) == 4.0 and list(grid) == [0.0, 0.5, 1.0]
    grid = np.array([0.0, 2.0], np.float32)
    assert normalize_(grid, "none") == 1.0 and list(grid) == [0.0, 2.0]


@pytest.mark.parametrize("shape", [(32, 32, 32), (48, 40, 16)])
def test_round_trip_stays_in_box_and_keeps_centroid(shape):
    pts = _cloud(20000, seed=3)
    pts = pts[np.linalg.norm((pts - pts.mean(0)) / [3000, 2000, 350], axis=1) < 0.8]  # an ellipsoid blob
    geo = GridGeometry.around(pts, shape)
    grid, _ = voxelize(pts, geo, "gaussian", 0.75)
    normalize_(grid, "max")
    for method in ["probabilistic", "weighted", "center", "random"]:
        back = grid_to_points(grid, geo, method, threshold=0.05, num_points=len(pts), rng=0)
        assert len(back) > 0 and geo.inside(back).all()
        assert np.all(np.abs(back.mean(0) - pts.mean(0)) < geo.spacing_nm), method


def test_grid_to_points_default_count_from_points_per_mass():
    pts = _cloud(4000)
    geo = GridGeometry.around(pts, 16)
    grid, _ = voxelize(pts, geo, "gaussian", 1.0)
    normalize_(grid, "max")
    ppm = len(pts) / grid_mass_um3(grid, geo)
    back = grid_to_points(grid, geo, threshold=0.0, points_per_mass=ppm, rng=1)
    assert len(back) == len(pts)
    # mass per µm³ does not change when the grid is resized, so the count follows the box, not the voxel count
    up = np.repeat(np.repeat(np.repeat(grid, 2, 0), 2, 1), 2, 2)
    assert abs(len(grid_to_points(up, geo, threshold=0.0, points_per_mass=ppm, rng=1)) - len(pts)) <= 1
    with pytest.raises(UserError, match="num_points"):
        grid_to_points(grid, geo)


def test_as_training_grid_rescales_to_the_maximum_and_raises_the_background():
    decoded = np.array([0.0, 0.0005, 0.2, 0.8], np.float32)
    info = {"normalization": {"rule": "max"}}
    np.testing.assert_allclose(as_training_grid(decoded, info, 0.001), [0.001, 0.001, 0.25, 1.0])
    np.testing.assert_array_equal(decoded, np.array([0.0, 0.0005, 0.2, 0.8], np.float32))  # the caller's grid as it was
    np.testing.assert_allclose(as_training_grid(decoded, info), [0.0, 0.000625, 0.25, 1.0])  # no level
    # grids of another normalization keep the decoded scale
    np.testing.assert_allclose(as_training_grid(decoded, {"normalization": {"rule": "percentile"}}), decoded)
    assert not as_training_grid(np.zeros(3, np.float32), info).any()


def _share_in(points, mask, geo):
    """The fraction of ``points`` that lie in the voxels where ``mask`` is true."""
    voxels = np.floor(geo.to_voxel(points)).astype(int).clip(0, np.array(mask.shape) - 1)
    return float(mask[tuple(voxels.T)].mean())


def test_a_decoded_grid_on_the_training_scale_gets_the_real_clouds_count_and_background():
    """A decoded grid loses its faint voxels (the decoder draws them as 0) and some of its peak (a maximum below 1).
    Rescaled and raised to the level that gives it back the real grid's mass, it gets the real cloud's number of
    points, and its empty voxels anchor some of them again (where the fine stage places them is its own test)."""
    from scripts.simulate_smlm import simulate_microtubules

    cloud = simulate_microtubules(1, seed=4, mean_points=8000)[0]
    geo = GridGeometry((0, 0, -300), (5000, 5000, 300), (64, 64, 16))
    real, _ = voxelize(cloud, geo, "gaussian", 1.0, "trilinear")
    normalize_(real, "max")
    ppm = len(cloud) / grid_mass_um3(real, geo)
    info = {"normalization": {"rule": "max"}}
    decoded = np.where(real > 0.01, real, 0.0).astype(np.float32) * 0.85
    empty = decoded == 0
    level = (real.sum() - decoded.sum() / 0.85) / empty.sum()  # the mass lost, spread over the empty voxels
    on_scale = as_training_grid(decoded, info, level)
    error = {name: abs(point_count(g, geo, None, ppm) - len(cloud)) for name, g in [("raw", decoded), ("on", on_scale)]}
    assert error["on"] <= 1 and error["raw"] > 0.1 * len(cloud)
    assert _share_in(grid_to_points(decoded, geo, threshold=0.0, points_per_mass=ppm, rng=0), empty, geo) == 0
    share = _share_in(grid_to_points(on_scale, geo, threshold=0.0, points_per_mass=ppm, rng=0), empty, geo)
    assert share == pytest.approx(level * empty.sum() / on_scale.sum(), rel=0.2)


def test_grid_to_points_is_seeded():
    grid = np.random.default_rng(0).random((8, 8, 8))
    geo = GridGeometry((0, 0, 0), (80, 80, 80), (8, 8, 8))
    a = grid_to_points(grid, geo, num_points=100, rng=5)
    np.testing.assert_array_equal(a, grid_to_points(grid, geo, num_points=100, rng=5))
    assert not np.array_equal(a, grid_to_points(grid, geo, num_points=100, rng=6))
