"""SIGKILL in the middle of an epoch, resume, and end with exactly the weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import EVENT_LIMIT_S, ROOT, diffusion_overrides, overrides, started, wait_for_line
from scripts.networks.checkpoints import load_checkpoint

# an overlay that pauses training after iteration ``pause_at`` (announcing it on stdout) so the test can kill there
HOOKS = "$__import__('tests.bundle_hooks').bundle_hooks"  # its own id: MONAI parses any "import" text before refs
PAUSE = "$@hooks.pause_after(@train#trainer, @pause_at)"


def _command(config, settings, overlay=None):
    configs = [f"configs/{config}"] + ([str(overlay)] if overlay else [])
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs)]
    for key, value in settings.items():
        args += [f"--{key}", str(value)]
    return args


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # one thread: bitwise-reproducible CPU kernels


def _kill_resume_compare(config, settings, out_a, out_b, stage, names, tmp_path):
    # an uninterrupted run of 3 epochs
    done = subprocess.run(
        _command(config, settings(out_a)), cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=EVENT_LIMIT_S
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # the same run, killed with SIGKILL after 2 of the 3 iterations of epoch 2
    overlay = tmp_path / "pause.json"
    overlay.write_text(json.dumps({"hooks": HOOKS, "pause_at": 5, "run": [PAUSE, "$@train#trainer.run()"]}))
    latest = out_b / "outputs" / stage / "latest_checkpoint.pt"
    args = _command(config, settings(out_b), overlay)
    with started(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env()) as child:
        wait_for_line(child, "paused at iteration")
        assert load_checkpoint(latest)["epoch"] == 1
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=EVENT_LIMIT_S)
    assert load_checkpoint(latest)["epoch"] == 1  # nothing beyond the interrupted epoch was lost, nothing half-written
    resumed = subprocess.run(
        _command(config, {**settings(out_b), "resume_from": latest}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=EVENT_LIMIT_S,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (latest.parent / ".lock").exists()  # the killed run's lock file, taken over and removed
    a = load_checkpoint(out_a / "outputs" / stage / "latest_checkpoint.pt")
    b = load_checkpoint(latest)
    assert a["epoch"] == b["epoch"] == 3 and a["iteration"] == b["iteration"] == 9
    for name in names:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}.{key} differs after resume"


def _stage1(dataset_dir):
    return lambda out: overrides(
        dataset_dir, out, fast_dev_run=False, n_epochs=3, autoencoder_warm_up_n_epochs=1, seed=7, val_interval=1
    )


@pytest.mark.parametrize("stage", ["autoencoder", "diffusion"])
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(stage, dataset_dir, autoencoder_ckpt, tmp_path):
    if stage == "autoencoder":
        settings, config, names = _stage1(dataset_dir), "train_autoencoder.json", ["autoencoder", "discriminator"]
    else:
        config, names = "train_diffusion.json", ["unet"]

        def settings(out):
            return diffusion_overrides(
                dataset_dir, autoencoder_ckpt, out, fast_dev_run=False, n_epochs=3, seed=7, generate_samples_interval=2
            )

    _kill_resume_compare(config, settings, tmp_path / "a", tmp_path / "b", stage, names, tmp_path)
