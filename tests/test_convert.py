import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_h5
from scripts.convert_h5_to_nifti import convert
from scripts.data.geometry import GridGeometry
from scripts.data.nifti import load_nifti
from scripts.data.pointclouds import read_point_clouds, write_point_clouds_h5
from scripts.data.tiles import cut_tiles
from scripts.data.voxelize import grid_to_points
from scripts.runtime.errors import UserError
from scripts.simulate_smlm import simulate_microtubules

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def clouds_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "mt.h5"
    subprocess.run(
        [
            sys.executable,
            "scripts/simulate_smlm.py",
            "--output",
            str(path),
            "--n_clouds",
            "10",
            "--mean_points",
            "3000",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return path


def _cli(*args):
    return subprocess.run(
        [sys.executable, "scripts/convert_h5_to_nifti.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True
    )


def test_cli_end_to_end(clouds_file, tmp_path):
    out = tmp_path / "vox"
    result = _cli(
        "--h5_file",
        clouds_file,
        "--output_dir",
        out,
        "--voxel_size",
        "[24,20,8]",
        "--method",
        "gaussian",
        "--sigma",
        "1.0",
        "--seed",
        "3",
    )
    assert result.returncode == 0, result.stderr
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["counts"]["n_train"] == 8 and info["counts"]["n_val"] == 2
    train = sorted((out / "train").glob("*.nii.gz"))
    assert len(train) == 8 and len(list((out / "val").glob("*.nii.gz"))) == 2
    geo = GridGeometry.from_dict(info["geometry"])
    clouds, _ = read_point_clouds(clouds_file)
    np.testing.assert_allclose(geo.box_min_nm, np.concatenate(clouds).min(axis=0))
    img = nib.load(train[0])
    assert img.shape == (24, 20, 8) and img.get_data_dtype() == np.float32
    assert img.header.get_xyzt_units()[0] == "micron"
    grid, geo_from_file = load_nifti(train[0])
    np.testing.assert_allclose(geo_from_file.box_min_nm, geo.box_min_nm, atol=1e-3)
    np.testing.assert_allclose(geo_from_file.box_max_nm, geo.box_max_nm, atol=1e-3)
    assert grid.max() == pytest.approx(1.0) and grid.min() >= 0
    # the split is recorded, reproducible, and the validation clouds are kept as points
    assert sorted(info["split"]["train"] + info["split"]["val"]) == list(range(10))
    val_points, _ = read_point_clouds(out / "val_points.h5")
    np.testing.assert_allclose(val_points[0], clouds[info["split"]["val"][0]], atol=1e-2)
    # points drawn back from a grid land in the training box
    back = grid_to_points(grid, geo, points_per_mass=info["points_per_mass"]["mean"], rng=0)
    assert geo.inside(back).all() and len(back) > 100


def test_split_is_seeded_and_percentile_rule(clouds_file, tmp_path):
    a = convert(clouds_file, tmp_path / "a", voxel_size=16, seed=1, normalize="percentile", percentile=99.0)
    b = convert(clouds_file, tmp_path / "b", voxel_size=16, seed=1, normalize="percentile", percentile=99.0)
    c = convert(clouds_file, tmp_path / "c", voxel_size=16, seed=2)
    assert a["split"] == b["split"] and a["split"] != c["split"]
    constant = a["normalization"]["constant"]
    assert constant > 0 and constant == b["normalization"]["constant"]
    grid, _ = load_nifti(next((tmp_path / "a" / "train").iterdir()))
    assert grid.max() <= 1.0


def test_percentile_over_empty_grids_is_one_line_and_writes_nothing(clouds_file, tmp_path, monkeypatch):
    import scripts.convert_h5_to_nifti as converter

    real = converter._grid
    monkeypatch.setattr(converter, "_grid", lambda *a: (real(*a)[0] * 0, *real(*a)[1:]))  # every grid empty
    with pytest.raises(UserError, match="every grid is empty"):
        convert(clouds_file, tmp_path / "out", voxel_size=16, normalize="percentile", num_workers=1)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_two_workers_write_the_same_files(clouds_file, tmp_path):
    one = convert(clouds_file, tmp_path / "one", voxel_size=16, no_compression=True)
    two = convert(clouds_file, tmp_path / "two", voxel_size=16, no_compression=True, num_workers=2)
    assert one["files"] == two["files"]
    for f in (tmp_path / "one" / "train").iterdir():
        assert f.suffix == ".nii" and f.read_bytes() == (tmp_path / "two" / "train" / f.name).read_bytes()


def test_real_thunderstorm_file_with_sigma_in_nm(tmp_path):
    info = convert(
        DATA / "ts3d_leterrier_real3d.csv",
        tmp_path / "ts",
        voxel_size=[32, 32, 8],
        sigma=[20, 20, 50],
        sigma_unit="nm",
        train_ratio=1.0,
        padding=100,
    )
    assert info["counts"]["points_inside"] == 11195 and info["source"]["format"] == "thunderstorm-csv"
    np.testing.assert_allclose(info["voxelization"]["sigma_nm"], [20, 20, 50])


def test_tiles_cut_rotated_boxes_from_one_acquisition(tmp_path):
    clouds, _ = read_point_clouds(DATA / "ts3d_leterrier_real3d.csv")
    tiles, sources = cut_tiles(clouds, 6, [2000, 2000, 700], seed=0)
    again, _ = cut_tiles(clouds, 6, [2000, 2000, 700], seed=0)
    assert len(tiles) == 6 and sources == [0] * 6
    for t, u in zip(tiles, again):
        np.testing.assert_array_equal(t, u)
        assert t.min() >= 0 and np.all(t.max(axis=0) <= [2000, 2000, 700])
    info = convert(
        DATA / "ts3d_leterrier_real3d.csv", tmp_path / "t", voxel_size=16, tiles=6, tile_size=[2000, 2000, 700]
    )
    assert info["geometry"]["box_min_nm"] == [0, 0, 0] and info["geometry"]["box_max_nm"] == [2000, 2000, 700]
    assert info["counts"]["n_train"] + info["counts"]["n_val"] == 6


def test_points_outside_a_given_box_are_dropped_and_counted(clouds_file, tmp_path):
    info = convert(clouds_file, tmp_path / "v", voxel_size=16, volume_dims=[2500, 2500, 600])
    assert info["counts"]["points_outside_box"] > 0
    clouds, _ = read_point_clouds(clouds_file)
    assert info["counts"]["points_inside"] + info["counts"]["points_outside_box"] == sum(map(len, clouds))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--h5_file", "{d}/missing.h5"], "missing.h5: no such file"),
        (["--h5_file", "{d}/notes.txt"], "notes.txt: no x/y columns"),
        (["--h5_file", "{d}/ok.h5", "--data_key", "clouds"], "key 'clouds' not found; keys in the file: point_clouds"),
        (["--h5_file", "{d}/flat.h5"], r"shape \(2, 10, 2\)"),
        (["--h5_file", "{d}/nan.h5"], "cloud 1 is empty"),
        (["--h5_file", "{d}/inf.h5", "--strict"], "NaN/Inf coordinates"),
        (["--h5_file", "{d}/ok.h5", "--volume_dims", "[10,10,10]", "--padding", "0"], "no points inside the box"),
        (["--h5_file", "{d}/ok.h5", "--sigma", "0"], "sigma: must be positive"),
        (["--h5_file", "{d}/ok.h5", "--sigma", "-1"], "sigma: must be positive"),
        (["--h5_file", "{d}/ok.h5", "--voxel_size", "0"], "voxel_size: expected a positive integer"),
        (["--h5_file", "{d}/ok.h5", "--voxel_size", "[16,16]"], "voxel_size: expected a positive integer"),
        (["--h5_file", "{d}/ok.h5", "--voxel_size", "12.5"], "voxel_size: expected a positive integer"),
        (["--h5_file", "{d}/ok.h5", "--method", "splat"], "method: expected one of"),
        (["--h5_file", "{d}/ok.h5", "--train_ratio", "0"], "train_ratio"),
    ],
)
def test_bad_input_one_line_nonzero_exit_nothing_written(tmp_path, args, message):
    rng = np.random.default_rng(0)
    (tmp_path / "notes.txt").write_text("hello world\n")
    write_h5(tmp_path / "ok.h5", point_clouds=rng.uniform(0, 1000, (4, 50, 3)))
    write_h5(tmp_path / "flat.h5", point_clouds=np.zeros((2, 10, 2)))
    nan = rng.uniform(0, 1000, (2, 10, 3))
    nan[1] = np.nan
    write_h5(tmp_path / "nan.h5", point_clouds=nan)
    inf = rng.uniform(0, 1000, (2, 10, 3))
    inf[0, 3, 2] = np.inf
    write_h5(tmp_path / "inf.h5", point_clouds=inf)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    result = _cli(*[a.format(d=tmp_path) for a in args], "--output_dir", out)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(message, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary folder left


def test_nonfinite_points_dropped_and_counted(tmp_path):
    arr = np.random.default_rng(0).uniform(0, 1000, (3, 20, 3))
    arr[0, 2, 1] = np.nan
    arr[2, 5, 0] = -np.inf
    info = convert(write_h5(tmp_path / "in.h5", point_clouds=arr), tmp_path / "o", voxel_size=8)
    assert info["source"]["nonfinite_dropped"] == 2 and info["counts"]["points_inside"] == 58


def test_existing_conversion_is_refused_then_overwritten_without_touching_other_files(clouds_file, tmp_path):
    out = tmp_path / "vox"
    convert(clouds_file, out, voxel_size=8)
    (out / "my_notes.txt").write_text("keep me")
    stamp = (out / "dataset_info.json").read_text()
    result = _cli("--h5_file", clouds_file, "--output_dir", out, "--voxel_size", "16")
    assert result.returncode == 2 and "already holds a conversion" in result.stderr
    assert (out / "dataset_info.json").read_text() == stamp
    result = _cli("--h5_file", clouds_file, "--output_dir", out, "--voxel_size", "16", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "dataset_info.json").read_text())["geometry"]["shape"] == [16, 16, 16]
    assert (out / "my_notes.txt").read_text() == "keep me"


def test_output_dir_that_is_a_file(clouds_file, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        convert(clouds_file, tmp_path / "f", voxel_size=8)


def test_simulated_demo_data_converts_at_demo_size(tmp_path):
    clouds = simulate_microtubules(4, seed=0, mean_points=2000)
    write_point_clouds_h5(tmp_path / "sim.h5", clouds)
    info = convert(tmp_path / "sim.h5", tmp_path / "o", voxel_size=[32, 32, 16], train_ratio=0.5)
    assert info["geometry"]["shape"] == [32, 32, 16] and info["counts"]["points_outside_box"] == 0


def test_hdf5_unit_attribute_is_honoured(tmp_path):
    import h5py

    path = write_h5(tmp_path / "um.h5", point_clouds=np.random.default_rng(0).uniform(0, 5, (3, 40, 3)))
    with h5py.File(path, "a") as f:
        f.attrs["unit"] = "um"
    info = convert(path, tmp_path / "o", voxel_size=8, train_ratio=0.5)
    assert info["geometry"]["box_max_nm"][0] > 4000 and info["source"]["unit_read"] == "um"
    # the bundle's own writer states nm, which stays nm
    write_point_clouds_h5(tmp_path / "nm.h5", read_point_clouds(path)[0])
    assert np.allclose(read_point_clouds(tmp_path / "nm.h5")[0][0], read_point_clouds(path)[0][0], atol=1e-3)


def test_box_is_anchored_at_zero_as_in_the_seed_or_centred_on_request(clouds_file, tmp_path):
    info = convert(clouds_file, tmp_path / "a", voxel_size=8, volume_dims=[5000, 5000, 600], padding=100)
    assert info["geometry"]["box_min_nm"] == [-100, -100, -100]
    assert info["geometry"]["box_max_nm"] == [5100, 5100, 700]
    info = convert(clouds_file, tmp_path / "c", voxel_size=8, volume_dims=[5000, 5000, 600], box_anchor="center")
    clouds, _ = read_point_clouds(clouds_file)
    pts = np.concatenate(clouds)
    centre = (np.array(info["geometry"]["box_min_nm"]) + info["geometry"]["box_max_nm"]) / 2
    np.testing.assert_allclose(centre, (pts.min(axis=0) + pts.max(axis=0)) / 2)


def test_clouds_with_no_point_in_the_box_are_skipped_and_recorded(tmp_path):
    rng = np.random.default_rng(0)
    clouds = [rng.uniform(0, [5000, 5000, 600], (50, 3)), rng.uniform(9000, 9500, (50, 3))]
    clouds += [rng.uniform(0, 600, (50, 3)), rng.uniform(100, 900, (60, 3))]
    write_point_clouds_h5(tmp_path / "far.h5", clouds)
    result = _cli("--h5_file", tmp_path / "far.h5", "--output_dir", tmp_path / "o", "--volume_dims", "[5000,5000,600]")
    assert result.returncode == 0, result.stderr
    assert "warning: 1 of 4 clouds have no point inside the box and are skipped" in result.stderr
    info = json.loads((tmp_path / "o" / "dataset_info.json").read_text())
    assert info["skipped_no_points_in_box"] == [1] and info["counts"]["n_skipped"] == 1
    assert sorted(info["split"]["train"] + info["split"]["val"]) == [0, 2, 3]
    assert len(read_point_clouds(tmp_path / "o" / "val_points.h5")[0]) == info["counts"]["n_val"]


def test_2d_data_convert_only_when_asked(picasso_file, tmp_path):
    result = _cli(
        "--h5_file",
        picasso_file,
        "--output_dir",
        tmp_path / "o",
        "--voxel_size",
        "[32,32,1]",
        "--tiles",
        "8",
        "--tile_size",
        "[3000,3000,1]",
        "--allow_2d",
        "true",
    )
    assert result.returncode == 0, result.stderr
    assert "note: 2D data" in result.stderr
    info = json.loads((tmp_path / "o" / "dataset_info.json").read_text())
    assert info["source"]["dims"] == 2 and info["geometry"]["shape"] == [32, 32, 1]


def test_far_outliers_are_named_with_a_hint(tmp_path):
    rng = np.random.default_rng(1)
    clouds = [rng.uniform(0, 5000, (2000, 3)) for _ in range(3)]
    clouds[1][0] = [1e9, 10, 10]
    write_point_clouds_h5(tmp_path / "out.h5", clouds)
    result = _cli("--h5_file", tmp_path / "out.h5", "--output_dir", tmp_path / "o", "--voxel_size", "8")
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"warning: .*out.h5: 1 points lie far outside the others along x .*pass --volume_dims", result.stderr
    ), result.stderr


def _mount_tmpfs(path, size):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "none", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")


def test_overwrite_on_a_mount_point_and_a_full_disk_keep_a_whole_conversion(clouds_file, tmp_path):
    out = tmp_path / "mnt"
    _mount_tmpfs(out, "3m")
    try:
        assert _cli("--h5_file", clouds_file, "--output_dir", out, "--voxel_size", "8").returncode == 0
        # another filesystem than its parent: the new conversion is staged on it, not beside it
        result = _cli("--h5_file", clouds_file, "--output_dir", out, "--voxel_size", "16", "--overwrite", "true")
        assert result.returncode == 0, result.stderr
        before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert json.loads((out / "dataset_info.json").read_text())["geometry"]["shape"] == [16, 16, 16]
        # a conversion that does not fit on the disk fails with one line and leaves the previous one whole
        result = _cli(
            "--h5_file",
            clouds_file,
            "--output_dir",
            out,
            "--voxel_size",
            "64",
            "--overwrite",
            "true",
            "--no_compression",
            "true",
        )
        assert result.returncode == 2
        assert re.fullmatch(r"error: .*: could not write \(No space left on device\).*", result.stderr.strip())
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    finally:
        subprocess.run(["umount", str(out)], capture_output=True)
