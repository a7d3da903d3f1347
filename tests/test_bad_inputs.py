"""Inputs that used to pass silently or with the wrong words: the demo over folders it did not write, and NaN/Inf
coordinates dropped by the converter. The one-line refusals themselves are in the misuse table (test_misuse.py)."""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from scripts import run_demo
from scripts.data.pointclouds import write_point_clouds_h5
from scripts.runtime.errors import UserError
from scripts.simulate_smlm import simulate_microtubules

ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TQDM_DISABLE="1")


def _state(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        for p in sorted(root.rglob("*"))
    }


def test_demo_refuses_a_model_it_did_not_train_before_any_step(tmp_path):
    model = tmp_path / "D" / "outputs" / "autoencoder" / "best_model.pt"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"a model the user trained for a week")
    write_point_clouds_h5(tmp_path / "mine.h5", simulate_microtubules(4, seed=3, mean_points=300))
    before = _state(tmp_path)
    demo = [sys.executable, "scripts/run_demo.py", "--input", tmp_path / "mine.h5", "--output_dir", tmp_path / "D"]
    result = subprocess.run(demo, cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(
        r"D/outputs/autoencoder: holds files the demo did not write \(best_model.pt\); .*choose another --output_dir",
        errors[0],
    ), errors[0]
    assert "$ " not in result.stdout  # no step was started
    assert _state(tmp_path) == before  # the model, and nothing else written


def test_demo_reuses_the_folders_it_marked_and_refuses_unmarked_ones(tmp_path):
    folders = run_demo.demo_folders(tmp_path / "data", tmp_path / "outputs", tmp_path / "logs", simulate=True)
    assert tmp_path / "outputs" / "autoencoder" in folders and tmp_path / "data" in folders
    with run_demo.marked_folders(folders, {"input": "simulated", "seed": 0}):
        (tmp_path / "outputs" / "autoencoder" / "best_model.pt").write_bytes(b"the demo's model")
        (tmp_path / "data" / "microtubules.h5").write_bytes(b"the demo's clouds")
    marker = json.loads((tmp_path / "outputs" / "autoencoder" / run_demo.MARKER).read_text())
    assert marker["written_by"] == "scripts/run_demo.py" and marker["input"] == "simulated"
    run_demo.check_demo_folders(folders)  # a re-run over the demo's own output goes ahead
    (tmp_path / "outputs" / "samples" / run_demo.MARKER).unlink()
    run_demo.check_demo_folders(folders)  # an empty folder holds nothing to lose
    (tmp_path / "outputs" / "samples" / "sample_0000.csv").write_text("x,y,z\n")
    with pytest.raises(UserError, match=r"outputs/samples: holds files the demo did not write \(sample_0000.csv\)"):
        run_demo.check_demo_folders(folders)


def test_a_failed_demo_step_leaves_no_folders_behind(tmp_path):
    (tmp_path / "D" / "logs").mkdir(parents=True)
    (tmp_path / "D" / "logs" / "notes.txt").write_text("the user's")
    folders = run_demo.demo_folders(tmp_path / "D" / "data", tmp_path / "D" / "outputs", tmp_path / "D" / "logs", False)
    with pytest.raises(SystemExit):
        with run_demo.marked_folders(folders, {"input": "x.h5", "seed": 0}):
            (tmp_path / "D" / "data" / "voxels_nifti" / "dataset_info.json").write_text("{}")
            sys.exit(2)  # what a failed step does
    kept = {"data/voxels_nifti/.run_demo.json", "data/voxels_nifti/dataset_info.json", "logs/notes.txt"}
    assert set(_state(tmp_path / "D")) == kept | {"data", "data/voxels_nifti", "logs"}  # outputs/, logs/* removed


def test_dropped_nan_coordinates_are_counted_aloud(tmp_path):
    rng = np.random.default_rng(3)
    clouds = [rng.uniform(0, [4000, 4000, 500], (150, 3)) for _ in range(5)]
    clouds[1][[3, 9], 0] = np.nan
    clouds[4][0, 2] = np.inf
    write_point_clouds_h5(tmp_path / "holes.h5", clouds)
    convert = [sys.executable, "scripts/convert_h5_to_nifti.py", "--h5_file", tmp_path / "holes.h5"]
    result = subprocess.run(
        [*convert, "--output_dir", tmp_path / "c", "--voxel_size", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr
    assert (
        f"warning: {tmp_path / 'holes.h5'}: dropped 3 points with NaN/Inf coordinates in 2 of 5 clouds "
        "(--strict true refuses them)"
    ) in result.stderr.splitlines()
    info = json.loads((tmp_path / "c" / "dataset_info.json").read_text())
    assert info["source"]["nonfinite_dropped"] == 3 and info["source"]["nonfinite_clouds"] == 2


def test_epochs_scale_multiplies_every_stage_and_is_checked_first(tmp_path, monkeypatch):
    calls = {}

    class StopError(Exception):
        pass

    def stage(config, settings, log=None):  # record each stage's settings; stop after the fine stage's
        calls[config] = settings
        if config == "train_refiner.json":
            raise StopError

    monkeypatch.setattr(run_demo, "bundle_step", stage)
    monkeypatch.setattr(run_demo, "run_step", lambda args, log=None: None)
    stages = ("train_autoencoder.json", "train_diffusion.json", "train_refiner.json")
    for scale, expected in ((1, [15, 80, 60]), (2, [30, 160, 120]), (0.5, [8, 40, 30])):
        calls.clear()
        with pytest.raises(StopError):
            run_demo.run_demo(output_dir=tmp_path / f"x{scale}", epochs_scale=scale)
        assert [calls[c]["n_epochs"] for c in stages] == expected
        assert calls["train_refiner.json"]["val_interval"] == expected[2]  # the fine stage still validates once
    with pytest.raises(UserError, match=r"^epochs_scale: expected a number above 0"):
        run_demo.run_demo(output_dir=tmp_path / "zero", epochs_scale=0)
    assert not (tmp_path / "zero").exists()  # refused before any folder was made


def test_a_failing_step_stops_the_demo_and_the_benchmarks_with_its_status(tmp_path, capfd):
    """``run_demo.run_step``, which the demo and the benchmarks run every step with: its output on the terminal or in
    a log, and the first failure stops the run with that step's status (the step's own line is kept)."""
    failing = [sys.executable, "-c", "import sys; print('step says why'); sys.exit(3)"]
    with pytest.raises(SystemExit) as stop:
        run_demo.run_step(failing)
    assert stop.value.code == 3 and "step says why" in capfd.readouterr().out
    log = tmp_path / "commands.log"
    with pytest.raises(SystemExit, match=rf"^failed \(3\): .*; see {re.escape(str(log))}$"):
        run_demo.run_step(failing, log)
    assert "step says why" in log.read_text() and log.read_text().startswith("$ ")
    run_demo.run_step([sys.executable, "-c", "print('fine')"], log)
    assert log.read_text().rstrip().endswith("fine")
