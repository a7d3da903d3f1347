"""Tests of the microtubule SMLM simulator and its HDF5 writer (``scripts/simulate_smlm.py``)."""

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy.spatial import cKDTree
from scripts.runtime.errors import UserError
from scripts.simulate_smlm import simulate_microtubules, write_point_clouds_h5

ROOT = Path(__file__).resolve().parents[1]
# Absolute coordinates, as from a stage: x far from 0, y and z negative.
BOX_MIN = np.array([20000.0, -3000.0, -400.0])
BOX_SIZE = np.array([5000.0, 5000.0, 600.0])


def _nearest_neighbour_nm(points):
    """Distance of each point to its nearest other point, nm."""
    distances, _ = cKDTree(points).query(points, k=2)
    return distances[:, 1]


def _uniform_like(cloud, seed=0):
    """A uniform cloud with the same count over the same box."""
    return BOX_MIN + np.random.default_rng(seed).uniform(size=cloud.shape) * BOX_SIZE


@pytest.fixture(scope="module")
def clouds():
    return simulate_microtubules(8, seed=1, box_min_nm=BOX_MIN, box_size_nm=BOX_SIZE, mean_points=5000)


def test_deterministic_for_a_seed_and_different_between_seeds():
    first = simulate_microtubules(3, seed=7, mean_points=2000)
    again = simulate_microtubules(3, seed=7, mean_points=2000)
    other = simulate_microtubules(3, seed=8, mean_points=2000)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not any(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(first, other))


def test_shape_dtype_box_and_counts(clouds):
    assert len(clouds) == 8
    for cloud in clouds:
        assert cloud.dtype == np.float32 and cloud.ndim == 2 and cloud.shape[1] == 3
        assert np.all(cloud >= BOX_MIN) and np.all(cloud <= BOX_MIN + BOX_SIZE)
        assert 3500 <= len(cloud) <= 6500  # 5000 * (1 +- 0.3)
    assert len({len(cloud) for cloud in clouds}) > 1


@pytest.mark.parametrize("fraction", [0.0, 0.1])
def test_background_fraction_roughly_as_asked(fraction):
    # Background points are isolated (nearest neighbour > 60 nm); points on filaments almost never are.
    simulated = simulate_microtubules(4, seed=2, background_fraction=fraction)
    isolated = np.mean([np.mean(_nearest_neighbour_nm(cloud) > 60.0) for cloud in simulated])
    assert abs(isolated - fraction) < 0.025, isolated


def test_structure_is_thin_filaments_not_uniform_noise(clouds):
    for cloud in clouds:
        uniform = _uniform_like(cloud)
        # Points crowd along lines: nearest neighbours are much closer than in a uniform cloud of the same count.
        assert _nearest_neighbour_nm(cloud).mean() < 0.5 * _nearest_neighbour_nm(uniform).mean()
        # Seen from above, they cover a small part of the field of view (100 nm pixels).
        bins, extent = 50, [[BOX_MIN[0], BOX_MIN[0] + BOX_SIZE[0]], [BOX_MIN[1], BOX_MIN[1] + BOX_SIZE[1]]]
        covered = np.mean(np.histogram2d(cloud[:, 0], cloud[:, 1], bins, extent)[0] > 0)
        covered_uniform = np.mean(np.histogram2d(uniform[:, 0], uniform[:, 1], bins, extent)[0] > 0)
        assert covered < 0.5 * covered_uniform


@pytest.mark.parametrize("z_min, z_size", [(-400.0, 600.0), (-1500.0, 1200.0), (100.0, 200.0)])
def test_z_follows_the_slab(z_min, z_size):
    box_min, box_size = (0.0, 0.0, z_min), (5000.0, 5000.0, z_size)
    z = np.concatenate(simulate_microtubules(4, seed=3, box_min_nm=box_min, box_size_nm=box_size))[:, 2]
    assert z.min() >= z_min and z.max() <= z_min + z_size
    spread = np.percentile(z, 95) - np.percentile(z, 5)
    assert 0.2 * z_size < spread < 0.9 * z_size
    assert abs(np.median(z) - (z_min + 0.5 * z_size)) < 0.2 * z_size


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"n_clouds": 0}, "n_clouds"),
        ({"box_size_nm": (5000.0, 0.0, 600.0)}, "box_size_nm"),
        ({"background_fraction": 1.0}, "background_fraction"),
        ({"background_fraction": -0.1}, "background_fraction"),
        ({"filaments_per_cloud": (4, 2)}, "filaments_per_cloud"),
    ],
)
def test_bad_arguments_raise_user_error_naming_them(kwargs, name):
    with pytest.raises(UserError, match=name):
        simulate_microtubules(**{"n_clouds": 1, **kwargs})


def test_hdf5_round_trip(clouds, tmp_path):
    path = tmp_path / "sub" / "clouds.h5"
    write_point_clouds_h5(path, clouds, sample_ids=np.arange(10, 18))
    assert [p.name for p in path.parent.iterdir()] == ["clouds.h5"]  # no temporary file left behind
    with h5py.File(path, "r") as f:
        assert f.attrs["unit"] == "nm"
        stored = f["point_clouds"][()]
        counts = f["actual_point_counts"][()]
        ids = f["sample_ids"][()]
    assert stored.dtype == np.float32 and stored.shape == (8, max(len(c) for c in clouds), 3)
    assert counts.dtype == np.int64 and counts.tolist() == [len(c) for c in clouds]
    assert ids.dtype == np.int64 and ids.tolist() == list(range(10, 18))
    for padded, count, cloud in zip(stored, counts, clouds):
        assert np.all(np.isnan(padded[count:]))
        assert np.array_equal(padded[~np.isnan(padded).any(axis=1)], cloud)


def _run_cli(*args):
    command = [sys.executable, "scripts/simulate_smlm.py", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_writes_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "demo.h5"
    args = ["--output", str(path), "--n_clouds", "2", "--mean_points", "500"]
    first = _run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert len(first.stdout.strip().splitlines()) == 1
    written = path.read_bytes()

    refused = _run_cli(*args, "--seed", "5")
    assert refused.returncode != 0
    assert len(refused.stderr.strip().splitlines()) == 1 and str(path) in refused.stderr
    assert path.read_bytes() == written

    replaced = _run_cli(*args, "--seed", "5", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    with h5py.File(path, "r") as f:
        assert f["point_clouds"].shape[0] == 2
