"""Ctrl-C, SIGTERM and SIGKILL in the middle of a conversion, a training epoch and a sampling run: one line, exit
130 or 143, no temporary or staging files left, and the earlier outputs whole.

Each test waits for an event (staged files, a printed line), never for a time. A run that writes files is frozen
(SIGSTOP) before it gets its signal, the test checks it is still in the middle, then lets it go on (SIGCONT) to
handle the signal: how busy the machine is cannot move the signal before or after the moment the test means.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
from conftest import EVENT_LIMIT_S, ROOT, overrides, started, wait_for_line
from scripts.data.pointclouds import write_point_clouds_h5
from scripts.networks.checkpoints import load_checkpoint
from scripts.simulate_smlm import simulate_microtubules

HOOKS = "$__import__('tests.bundle_hooks').bundle_hooks"
PAUSE = "$@hooks.pause_after(@train#trainer, @pause_at)"
ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")


def _hashes(folder):
    """SHA-256 of every file under ``folder`` except staging folders (checked on their own)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file() and ".staging-" not in p.as_posix()
    }


def _wait_for(predicate, child):
    """Wait until ``predicate()`` holds; fail when ``child`` ends first (or, never seeing it, after a long limit)."""
    start = time.monotonic()
    while not predicate():
        assert child.poll() is None, f"the run ended (exit status {child.returncode}) before the awaited moment"
        assert time.monotonic() - start < EVENT_LIMIT_S, "the awaited moment never came"
        time.sleep(0.02)


@contextmanager
def _frozen(child):
    """``child`` stopped for the block (signals sent meanwhile are handled when it goes on)."""
    child.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        child.send_signal(signal.SIGCONT)


def _staged_files(folder, pattern="*.nii.gz"):
    return [p for s in folder.glob(".staging-*") for p in (s / "new").rglob(pattern)]


def _mid_run(folder, pattern, total):
    """Staged files of a run that is still writing them: some, not all, and no journal of the swap yet."""
    return 0 < len(_staged_files(folder, pattern)) < total and not list(folder.glob(".staging-*/commit.json"))


N_CLOUDS = 40


@pytest.fixture(scope="module")
def many_clouds(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "mt.h5"
    write_point_clouds_h5(path, simulate_microtubules(N_CLOUDS, seed=3, mean_points=500))
    return path


def _run(args, **kwargs):
    return subprocess.run(args, cwd=ROOT, env=ENV, timeout=EVENT_LIMIT_S, **kwargs)


def _convert(source, out, *extra):
    args = [sys.executable, "scripts/convert_h5_to_nifti.py", "--h5_file", str(source), "--output_dir", str(out)]
    return args + ["--voxel_size", "[160,160,64]", *extra]


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_conversion_interrupted_keeps_the_earlier_conversion(many_clouds, tmp_path, signum, status):
    out = tmp_path / "vox"
    assert _run(_convert(many_clouds, out, "--voxel_size", "8")).returncode == 0
    before = _hashes(out)
    args = _convert(many_clouds, out, "--overwrite", "true")
    with started(args, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True) as child:
        _wait_for(lambda: len(_staged_files(out)) >= 2, child)  # writing the new grids
        with _frozen(child):
            assert _mid_run(out, "*.nii.gz", N_CLOUDS)
            child.send_signal(signum)
        _, stderr = child.communicate(timeout=EVENT_LIMIT_S)
    assert child.returncode == status, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: interrupted by {signal.Signals(signum).name}"], stderr
    assert "Traceback" not in stderr
    assert _hashes(out) == before and not list(out.glob(".staging-*"))


def test_conversion_killed_leaves_staging_that_the_next_run_removes(many_clouds, tmp_path):
    out = tmp_path / "vox"
    assert _run(_convert(many_clouds, out, "--voxel_size", "8")).returncode == 0
    before = _hashes(out)
    with started(_convert(many_clouds, out, "--overwrite", "true"), cwd=ROOT, env=ENV) as child:
        _wait_for(lambda: len(_staged_files(out)) >= 2, child)
        with _frozen(child):
            assert _mid_run(out, "*.nii.gz", N_CLOUDS)
            child.send_signal(signal.SIGKILL)
        child.wait(timeout=EVENT_LIMIT_S)
    assert child.returncode == -signal.SIGKILL
    assert {k: v for k, v in _hashes(out).items() if k != ".lock"} == before  # the earlier conversion is whole ...
    assert len(list(out.glob(".staging-*"))) == 1  # ... beside the dead run's staging folder and lock file
    result = _run(
        _convert(many_clouds, out, "--voxel_size", "8", "--overwrite", "true"), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "removing the staging folder of a run that did not finish" in result.stderr
    assert not list(out.glob(".staging-*")) and not (out / ".lock").exists()


def test_killed_during_the_swap_is_completed_at_the_next_start(many_clouds, tmp_path):
    """A run killed after its journal, half-way through moving files: the next start finishes the swap."""
    from scripts.runtime.output_folders import recover_stale_staging

    out, new = tmp_path / "vox", tmp_path / "new"
    assert _run(_convert(many_clouds, out, "--voxel_size", "8")).returncode == 0
    assert _run(_convert(many_clouds, new, "--voxel_size", "16")).returncode == 0
    files = sorted(f for f in _hashes(new) if f != ".manifest.json")
    old = json.loads((out / ".manifest.json").read_text())["files"]
    staging = out / ".staging-999999999-dead"  # a pid no process has
    for rel in files:
        (staging / "new" / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(new / rel, staging / "new" / rel)
    (staging / "commit.json").write_text(json.dumps({"new": files, "old": old}))
    # what the swap had done when the kill came: the earlier files moved aside, half of the new ones moved in
    for rel in old:
        (staging / "old" / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(out / rel, staging / "old" / rel)
    for rel in files[: len(files) // 2]:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / "new" / rel, out / rel)
    recover_stale_staging(out)
    assert not list(out.glob(".staging-*"))
    assert json.loads((out / "dataset_info.json").read_text())["geometry"]["shape"] == [16, 16, 16]
    assert json.loads((out / ".manifest.json").read_text())["files"] == files
    assert sorted(_hashes(out)) == sorted(files + [".manifest.json"])


def test_training_interrupted_names_the_intact_checkpoint(dataset_dir, tmp_path):
    overlay = tmp_path / "pause.json"
    overlay.write_text(json.dumps({"hooks": HOOKS, "pause_at": 5, "run": [PAUSE, "$@train#trainer.run()"]}))
    settings = overrides(dataset_dir, tmp_path, fast_dev_run=False, n_epochs=3)
    args = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(["configs/train_autoencoder.json", str(overlay)]),
    ]
    for key, value in settings.items():
        args += [f"--{key}", str(value)]
    with started(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        wait_for_line(child, "paused at iteration")
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=EVENT_LIMIT_S)
    latest = tmp_path / "outputs" / "autoencoder" / "latest_checkpoint.pt"
    assert child.returncode == 130, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: interrupted by SIGINT; at epoch 2, iteration 5: {latest} (epoch 1) is intact; resume with "
        f"--resume_from {latest}"
    ], stderr[-3000:]
    assert load_checkpoint(latest)["epoch"] == 1
    assert not [p for p in (tmp_path / "outputs").rglob("*") if p.name.endswith(".tmp") or p.name == ".lock"]


def test_sampling_terminated_keeps_the_earlier_samples(model_dir, tmp_path):
    out = tmp_path / "samples"
    base = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--model_dir",
        str(model_dir),
        "--output_dir",
        str(out),
        "--num_inference_steps",
        "2",
    ]
    assert _run(base + ["--num_samples", "2"], capture_output=True).returncode == 0
    before = _hashes(out)
    args = base + ["--num_samples", "400", "--batch_size", "1", "--overwrite", "true"]
    with started(args, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True) as child:
        _wait_for(lambda: _staged_files(out, "*.csv"), child)  # samples being written
        with _frozen(child):
            assert _mid_run(out, "*.csv", 400)
            child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=EVENT_LIMIT_S)
    assert child.returncode == 143, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: interrupted by SIGTERM; no samples were written; {out} is as it was"], stderr[-3000:]
    assert _hashes(out) == before and not list(out.glob(".staging-*"))
