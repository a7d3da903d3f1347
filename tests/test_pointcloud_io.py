from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_h5
from scripts.data.pointclouds import read_point_clouds, write_point_clouds_h5, write_points_csv
from scripts.runtime.errors import UserError

DATA = Path(__file__).parent / "data"


def test_thunderstorm_csv_real_file():
    clouds, meta = read_point_clouds(DATA / "ts3d_leterrier_real3d.csv")
    assert meta["format"] == "thunderstorm-csv" and len(clouds) == 1
    pts = clouds[0]
    assert pts.shape == (11195, 3)
    # extents documented for this file: x 22882-27777, y 17336-22316, z -340-264 nm
    np.testing.assert_allclose(pts.min(axis=0), [22882.1555, 17336.12555, -340.189])
    np.testing.assert_allclose(pts.max(axis=0), [27777.44517, 22316.13222, 264.314])


def test_picasso_reads_pixel_size_from_yaml(picasso_file):
    clouds, meta = read_point_clouds(picasso_file)
    with h5py.File(picasso_file) as f:
        locs = f["locs"][()]
    assert meta["format"] == "picasso" and meta["pixel_size_nm"] == 130.0
    np.testing.assert_allclose(clouds[0][:, 0], locs["x"].astype(np.float64) * 130.0)
    np.testing.assert_allclose(clouds[0][:, 2], 0.0)  # 2D data: z = 0


def test_picasso_without_yaml_needs_pixel_size(tmp_path):
    target = tmp_path / "locs.hdf5"
    target.write_bytes((DATA / "picasso_egfr_mols_real2d.hdf5").read_bytes())
    with pytest.raises(UserError, match="pixel_size"):
        read_point_clouds(target)
    clouds, meta = read_point_clouds(target, pixel_size_nm=100.0)
    assert meta["pixel_size_nm"] == 100.0 and clouds[0].shape == (4230, 3)


@pytest.mark.parametrize("key", ["point_clouds", "pointclouds", "data"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_hdf5_array_keys_and_dtypes(tmp_path, key, dtype):
    arr = np.random.default_rng(0).uniform(-500, 500, (3, 50, 3)).astype(dtype)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f[key] = arr
    clouds, meta = read_point_clouds(tmp_path / "a.h5")
    assert meta["key"] == key and len(clouds) == 3
    np.testing.assert_array_equal(clouds[1], arr[1].astype(np.float64))


def test_pointnet_layout_is_unitless(tmp_path):
    with h5py.File(tmp_path / "ply_data_train0.h5", "w") as f:
        f["data"] = np.random.default_rng(0).normal(size=(2, 2048, 3)).astype(np.float32)
        f["label"] = np.zeros((2, 1), np.uint8)
    clouds, meta = read_point_clouds(tmp_path / "ply_data_train0.h5")
    assert meta["format"] == "pointnet" and meta["unit"] == "unitless" and clouds[0].shape == (2048, 3)


def test_ragged_hdf5_datasets_and_groups(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [10, 30, 20]
    with h5py.File(tmp_path / "r.h5", "w") as f:
        for i, n in enumerate(sizes):
            f[f"cloud_{i}"] = rng.normal(size=(n, 3))
    with h5py.File(tmp_path / "g.h5", "w") as f:
        g = f.create_group("nested")
        f["other"] = np.zeros(4)
        for i, n in enumerate(sizes):
            g.create_group(f"c{i + 8}")["points"] = rng.normal(size=(n, 3))
    clouds, meta = read_point_clouds(tmp_path / "r.h5")
    assert [len(c) for c in clouds] == sizes and meta["format"] == "hdf5-ragged"
    clouds, meta = read_point_clouds(tmp_path / "g.h5", key="nested")
    assert meta["members"] == ["c8", "c9", "c10"]  # natural order, not c10 < c8


def test_padding_nan_counts_and_zero_rows(tmp_path):
    arr = np.ones((2, 6, 3), np.float32)
    arr[0, 4:] = np.nan  # NaN padding
    arr[1, 5] = 0.0  # a real point at the origin, or padding: the user says
    arr[1, 2, 1] = np.inf  # a bad coordinate
    with h5py.File(tmp_path / "p.h5", "w") as f:
        f["point_clouds"] = arr
    clouds, meta = read_point_clouds(tmp_path / "p.h5")
    assert [len(c) for c in clouds] == [4, 5]
    assert meta["padding_dropped"] == 2 and meta["nonfinite_dropped"] == 1
    clouds, _ = read_point_clouds(tmp_path / "p.h5", zero_is_padding=True)
    assert [len(c) for c in clouds] == [4, 4]
    with pytest.raises(UserError, match="NaN/Inf"):
        read_point_clouds(tmp_path / "p.h5", strict=True)


def test_actual_point_counts_truncate(tmp_path):
    arr = np.arange(2 * 5 * 3, dtype=np.float64).reshape(2, 5, 3)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["point_clouds"] = arr
        f["actual_point_counts"] = [3, 5]
    clouds, _ = read_point_clouds(tmp_path / "c.h5")
    assert [len(c) for c in clouds] == [3, 5]
    clouds, _ = read_point_clouds(tmp_path / "c.h5", actual_point_counts=[1, 2])
    assert [len(c) for c in clouds] == [1, 2]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("x,y,z\n1,2,3\n4,5,6\n", [[1, 2, 3], [4, 5, 6]]),
        ('"x [nm]","y [nm]","z [nm]","frame"\n1,2,3,7\n', [[1, 2, 3]]),
        ("id\tx [um]\ty [um]\tz [um]\n0\t1\t2\t3\n", [[1000, 2000, 3000]]),
        ("x;y\n1;2\n", [[1, 2, 0]]),
    ],
)
def test_csv_variants(tmp_path, text, expected):
    (tmp_path / "a.csv").write_text(text)
    clouds, _ = read_point_clouds(tmp_path / "a.csv")
    np.testing.assert_allclose(clouds[0], expected)


def test_csv_round_trip_with_thunderstorm_header(tmp_path):
    pts = np.random.default_rng(1).uniform(-1000, 30000, (100, 3))
    write_points_csv(tmp_path / "out.csv", pts)
    assert (tmp_path / "out.csv").read_text().splitlines()[0] == '"x [nm]","y [nm]","z [nm]"'
    clouds, meta = read_point_clouds(tmp_path / "out.csv")
    np.testing.assert_allclose(clouds[0], pts, atol=1e-3)


def test_h5_writer_round_trip(tmp_path):
    clouds = [np.random.default_rng(i).normal(size=(n, 3)).astype(np.float32) for i, n in enumerate([5, 9])]
    write_point_clouds_h5(tmp_path / "w.h5", clouds)
    back, meta = read_point_clouds(tmp_path / "w.h5")
    assert meta["key"] == "point_clouds"
    for a, b in zip(clouds, back):
        np.testing.assert_array_equal(a, b)


def _text(path, text):
    path.write_text(text)
    return path


def _bytes(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.h5", "no such file"),
        (lambda d: _text(d / "a.txt", ""), "empty file"),
        (lambda d: _bytes(d / "a.npy", b"\x93NUMPY"), "not an HDF5 or CSV"),
        (lambda d: _text(d / "fake.h5", "x,y,z\n"), "not an HDF5 or CSV"),
        (lambda d: write_h5(d / "k.h5", coords=np.zeros((2, 5, 3)), labels=np.zeros(2)), "keys in the file: coords"),
        (lambda d: write_h5(d / "s.h5", point_clouds=np.zeros((2, 5, 2))), r"shape \(2, 5, 2\)"),
        (lambda d: write_h5(d / "n.h5", point_clouds=np.full((2, 5, 3), np.nan)), "cloud 0 is empty"),
        (lambda d: _text(d / "h.csv", "a,b,c\n1,2,3\n"), "no x/y columns"),
        (lambda d: _text(d / "v.csv", "x,y,z\n1,2,abc\n"), "cannot parse"),
        (lambda d: _text(d / "u.csv", "x [px],y [px]\n1,2\n"), "pixel_size"),
    ],
)
def test_bad_files_get_one_line_naming_the_file(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(UserError, match=message) as info:
        read_point_clouds(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_unknown_given_key_lists_keys(tmp_path):
    path = write_h5(tmp_path / "a.h5", point_clouds=np.zeros((1, 4, 3)))
    with pytest.raises(UserError, match="key 'clouds' not found; keys in the file: point_clouds"):
        read_point_clouds(path, key="clouds")
