"""Faults: kills during a save, corrupt and hostile checkpoints, a full disk, and no unsafe loading anywhere."""

import errno
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scripts.networks.checkpoints import load_checkpoint, save_checkpoint
from scripts.runtime.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _payload(value):
    return {"stage": "autoencoder", "autoencoder": {"w": torch.full((256, 256), float(value))}}


def test_kill_inside_a_save_keeps_the_previous_checkpoint(tmp_path):
    target = tmp_path / "latest_checkpoint.pt"
    save_checkpoint(target, _payload(1))
    # a child process starts writing the next checkpoint, pauses half-way through the file, and is killed there
    driver = f"""
import io, sys, time, torch
sys.path.insert(0, {str(ROOT)!r})
import scripts.networks.checkpoints as c
real_save = torch.save
def slow_save(obj, f):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    print('half written', flush=True)
    time.sleep(60)
    f.write(data[len(data) // 2 :])
c.torch.save = slow_save
c.save_checkpoint({str(target)!r}, {{'stage': 'autoencoder', 'autoencoder': {{'w': torch.full((256, 256), 2.0)}}}})
"""
    child = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "half written"
    partial = [p for p in tmp_path.iterdir() if p.name != target.name]
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the new data went to a temporary file
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert torch.equal(load_checkpoint(target)["autoencoder"]["w"], torch.full((256, 256), 1.0))


def test_truncated_checkpoint_is_refused(tmp_path):
    save_checkpoint(tmp_path / "ok.pt", _payload(1))
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match=r"cut.pt: not a readable checkpoint, truncated or corrupt") as info:
        load_checkpoint(tmp_path / "cut.pt")
    assert "\n" not in str(info.value)


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format_version": 1, "stage": "autoencoder", "evil": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match=r"evil.pt: refused, it holds objects that are not plain weights"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_not_a_bundle_checkpoint_and_wrong_stage(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="not a checkpoint of this bundle"):
        load_checkpoint(tmp_path / "plain.pt")
    save_checkpoint(tmp_path / "ae.pt", _payload(0))
    with pytest.raises(UserError, match="is a 'autoencoder' checkpoint, expected 'diffusion'"):
        load_checkpoint(tmp_path / "ae.pt", "diffusion")


def test_disk_full_keeps_the_previous_file_and_says_so(tmp_path, monkeypatch):
    target = tmp_path / "best_model.pt"
    save_checkpoint(target, _payload(1))

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match=r"best_model.pt: could not write \(No space left on device\)"):
        save_checkpoint(target, _payload(2))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.pt"]  # no temporary file left behind
    assert torch.equal(load_checkpoint(target)["autoencoder"]["w"], torch.full((256, 256), 1.0))


def test_sample_write_on_a_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    import numpy as np
    from scripts.data.pointclouds import write_points_csv

    write_points_csv(tmp_path / "sample_0000.csv", np.zeros((3, 3)))
    before = (tmp_path / "sample_0000.csv").read_text()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savetxt", full_disk)
    with pytest.raises(UserError, match=r"sample_0000.csv: could not write \(No space left on device\)"):
        write_points_csv(tmp_path / "sample_0000.csv", np.ones((3, 3)))
    assert (tmp_path / "sample_0000.csv").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample_0000.csv"]


def test_no_unsafe_torch_load_in_the_repository():
    offenders = []
    for path in list((ROOT / "scripts").rglob("*.py")) + list((ROOT / "configs").glob("*.json")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"torch\.load\(", line) and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
    assert "weights_only=True" in (ROOT / "scripts" / "networks" / "checkpoints.py").read_text()
