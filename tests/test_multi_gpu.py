"""torchrun with two CPU processes (gloo): the multi-GPU overlays run on a laptop, which is how CI tests them."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_REFINER, diffusion_overrides, overrides, run_workflow
from monai.bundle import ConfigParser
from scripts.networks.checkpoints import load_checkpoint

HOOKS = "$__import__('tests.bundle_hooks').bundle_hooks"  # its own id: MONAI parses any "import" text before refs
SEEN = "$@hooks.record_files(@train#trainer, @train#sampler, @train#datalist, @seen_file)"


def _torchrun(stage, settings, tmp_path):
    """Run ``configs/<stage>.json`` + its multi-GPU overlay + a test overlay that records each rank's files."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    overlay = tmp_path / "record_files.json"
    overlay.write_text(
        json.dumps(
            {"hooks": HOOKS, "seen_file": str(tmp_path / "seen_rank{}.txt"), "run": [SEEN, "$@train#trainer.run()"]}
        )
    )
    configs = [f"configs/{stage}.json", f"configs/multi_gpu_{stage}.json", str(overlay)]
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free rendezvous port: back-to-back launches never meet a port still in use
        "--nproc_per_node=2",
        "--log-dir",
        str(tmp_path / "ranks"),
        "--redirects",
        "3",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(configs),
    ]
    for key, value in settings.items():
        args += [f"--{key}", str(value)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def _rank_logs(tmp_path, name="stdout.log"):
    logs = {}
    for path in (tmp_path / "ranks").rglob(name):
        logs[int(path.parent.name)] = path.read_text()
    return logs


def _explain(result, tmp_path):
    """The launcher's last lines and each rank's own stderr: what a failed launch is read from."""
    ranks = "".join(
        f"\n--- rank {r} stderr ---\n{log[-3000:]}" for r, log in sorted(_rank_logs(tmp_path, "stderr.log").items())
    )
    return f"exit {result.returncode}\n--- torchrun ---\n{result.stderr[-2000:]}{ranks}"


def _seen(tmp_path):
    return [set((tmp_path / f"seen_rank{r}.txt").read_text().split()) for r in (0, 1)]


def test_two_processes_train_both_stages(dataset_dir, tmp_path):
    stage1 = tmp_path / "s1"
    result = _torchrun("train_autoencoder", overrides(dataset_dir, stage1), stage1)
    assert result.returncode == 0, _explain(result, stage1)
    ckpt_dir, log_dir = stage1 / "outputs" / "autoencoder", stage1 / "logs" / "autoencoder"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best_model.pt", "latest_checkpoint.pt"]
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1  # rank 0 only
    rank0, rank1 = _seen(stage1)
    train_files = {str(p) for p in (dataset_dir / "train").iterdir()}
    assert rank0 and rank1 and not rank0 & rank1 and rank0 | rank1 == train_files
    assert len(rank0) == len(rank1) == len(train_files) // 2

    # validation metrics were reduced across ranks: one process evaluating the best weights on all validation
    # volumes gets the Dice the two ranks (one validation volume each) reported together
    best = load_checkpoint(ckpt_dir / "best_model.pt")
    parser = ConfigParser()
    parser.read_config(ROOT / "configs" / "train_autoencoder.json")
    parser.update({**overrides(dataset_dir, tmp_path / "single"), "device": "$torch.device('cpu')"})
    parser.get_parsed_content("autoencoder").load_state_dict(best["autoencoder"])
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    assert len(list((dataset_dir / "val").iterdir())) == 2
    assert evaluator.state.metrics["val_dice"] == pytest.approx(best["best_metric"], abs=1e-5)

    # the DDP checkpoint resumes in a single process
    workflow = run_workflow(
        "train_autoencoder.json",
        **overrides(dataset_dir, stage1, n_epochs=2, resume_from=str(ckpt_dir / "latest_checkpoint.pt")),
    )
    assert workflow.parser.get_parsed_content("train#trainer").state.epoch == 2

    stage2 = tmp_path / "s2"
    result = _torchrun(
        "train_diffusion",
        diffusion_overrides(dataset_dir, ckpt_dir / "best_model.pt", stage2, generate_samples_interval=1),
        stage2,
    )
    assert result.returncode == 0, _explain(result, stage2)
    ckpt = load_checkpoint(stage2 / "outputs" / "diffusion" / "latest_checkpoint.pt", "diffusion")
    per_rank = [
        float(re.search(r"this rank: ([0-9.]+)", log).group(1)) for _, log in sorted(_rank_logs(stage2).items())
    ]
    assert len(per_rank) == 2 and per_rank[0] != per_rank[1]  # each rank computed on its own shard
    assert ckpt["scale_factor"] == pytest.approx(sum(per_rank) / 2, abs=2e-6)
    assert len(list((stage2 / "logs" / "diffusion").glob("events.out.tfevents.*"))) == 1
    rank0, rank1 = _seen(stage2)
    assert rank0 and rank1 and not rank0 & rank1

    # the fine stage under the same overlay: each rank trains on its own half, validation is reduced across ranks
    fine = tmp_path / "fine"
    settings = {
        "dataset_dir": str(dataset_dir),
        "autoencoder_path": str(ckpt_dir / "best_model.pt"),
        "ckpt_dir": str(fine / "outputs" / "refiner"),
        "log_dir": str(fine / "logs" / "refiner"),
        **{k: json.dumps(v) for k, v in TINY_REFINER.items()},
        "batch_size": 1,
        "points_per_volume": 32,
        "fast_dev_run": "true",
        "n_epochs": 1,
        "val_interval": 1,
        "flow_steps": 2,
    }
    result = _torchrun("train_refiner", settings, fine)
    assert result.returncode == 0, _explain(result, fine)
    assert load_checkpoint(fine / "outputs" / "refiner" / "best_model.pt", "refiner")["best_metric"] > 0
    assert len(list((fine / "logs" / "refiner").glob("events.out.tfevents.*"))) == 1
    rank0, rank1 = _seen(fine)
    assert rank0 and rank1 and not rank0 & rank1
