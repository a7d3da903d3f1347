"""The bundle as users get it: a zip from a URL (a local HTTP server here), its large files, then sampling."""

import functools
import hashlib
import http.server
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import yaml
from scripts.data.geometry import GridGeometry
from scripts.data.pointclouds import read_point_clouds
from scripts.networks.checkpoints import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NAME = "smlm_ldm"


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path / "www"``; yields its base URL."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _bundle_files():
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [f for f in listed if (ROOT / f).is_file() and not f.startswith("tests/")]


def _monai(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_download_zip_large_files_and_sample(server, tmp_path):
    www, url = server
    with zipfile.ZipFile(www / f"{NAME}.zip", "w") as archive:
        for name in _bundle_files():
            archive.write(ROOT / name, f"{NAME}/{name}")
    result = _monai(
        "download", "--name", NAME, "--url", f"{url}/{NAME}.zip", "--bundle_dir", tmp_path / "bundles", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    bundle = tmp_path / "bundles" / NAME
    assert (bundle / "configs" / "inference.json").is_file()

    # large_files.yml lists the shipped weights with their hashes: fetch them again from the "release" URL
    spec = yaml.safe_load((bundle / "large_files.yml").read_text())
    for entry in spec["large_files"]:
        data = (bundle / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["hash_val"]
        (www / Path(entry["url"]).name).write_bytes(data)
        entry["url"] = f"{url}/{Path(entry['url']).name}"
        (bundle / entry["path"]).unlink()
    (bundle / "large_files.yml").write_text(yaml.safe_dump(spec))
    result = _monai("download_large_files", "--bundle_path", bundle, cwd=bundle)
    assert result.returncode == 0, result.stderr[-2000:]
    assert all((bundle / entry["path"]).is_file() for entry in spec["large_files"])

    result = _monai(
        "run",
        "--config_file",
        "configs/inference.json",
        "--num_samples",
        1,
        "--num_inference_steps",
        3,
        "--output_dir",
        "samples",
        cwd=bundle,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # no trained outputs in a downloaded bundle: the shipped weights are used, and the log says which
    log = result.stdout + result.stderr
    assert "using the weights shipped in models" in log and "diffusion weights: models/model.pt" in log
    box = GridGeometry.from_dict(load_checkpoint(bundle / "models" / "model.pt")["dataset_info"]["geometry"])
    points = read_point_clouds(bundle / "samples" / "pointcloud" / "sample_0000.csv")[0][0]
    assert len(points) > 0 and box.inside(points).all()
    assert (bundle / "samples" / "nifti" / "sample_0000.nii.gz").is_file()
