import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import ROOT, overrides, run_cli, run_workflow, user_error
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.networks.nets import AutoencoderKL, PatchDiscriminator
from scripts.networks.checkpoints import load_checkpoint
from scripts.runtime.errors import UserError
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def test_config_defaults_follow_the_seed_and_build():
    parser = ConfigParser()
    parser.read_config(ROOT / "configs" / "train_autoencoder.json")
    for key, value in {
        "n_epochs": 500,
        "batch_size": 2,
        "learning_rate": 1e-4,
        "adv_weight": 0.01,
        "perceptual_weight": 0.001,
        "kl_weight": 1e-6,
        "autoencoder_warm_up_n_epochs": 5,
        "num_channels": [32, 64, 64],
        "amp": True,
        "resume_from": None,
    }.items():
        assert parser[key] == value, key
    assert parser["train_data_dir"] == "$@dataset_dir + '/train'"
    parser["device"] = "$torch.device('cpu')"
    autoencoder = parser.get_parsed_content("autoencoder")
    assert isinstance(autoencoder, AutoencoderKL)
    assert [b.conv.out_channels for b in autoencoder.encoder.blocks if hasattr(b, "conv")][:1] == [32]
    assert isinstance(parser.get_parsed_content("discriminator"), PatchDiscriminator)
    assert parser.get_parsed_content("train#perceptual_loss") is None  # no weights file given: the term is off


def test_fast_dev_run_writes_checkpoints_and_events_then_resumes(dataset_dir, tmp_path):
    result = run_cli("train_autoencoder.json", **overrides(dataset_dir, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt_dir, log_dir = tmp_path / "outputs" / "autoencoder", tmp_path / "logs" / "autoencoder"
    latest = load_checkpoint(ckpt_dir / "latest_checkpoint.pt", "autoencoder")
    best = load_checkpoint(ckpt_dir / "best_model.pt", "autoencoder")
    assert latest["epoch"] == 1 and latest["iteration"] == 2 and best["epoch"] == 1
    events = EventAccumulator(str(log_dir)).Reload()
    assert "val/input_vs_reconstruction" in events.Tags()["images"]
    assert {"train/recon_loss", "train/kl_loss", "train/disc_loss", "val_dice", "val_psnr"} <= set(
        events.Tags()["scalars"]
    )
    info = json.loads((dataset_dir / "dataset_info.json").read_text())
    assert latest["dataset_info"]["geometry"] == info["geometry"]
    assert latest["dataset_info"]["points_per_mass"] == info["points_per_mass"]
    assert latest["network_config"]["autoencoder"]["channels"] == [8, 16]
    assert latest["g_optimizer"]["state"][0]["step"] == 2

    workflow = run_workflow(
        "train_autoencoder.json",
        **overrides(dataset_dir, tmp_path, n_epochs=2, resume_from=str(ckpt_dir / "latest_checkpoint.pt")),
    )
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2
    resumed = load_checkpoint(ckpt_dir / "latest_checkpoint.pt")
    assert resumed["epoch"] == 2 and resumed["iteration"] == 4
    # Adam's step count continues from the checkpoint: 2 steps before, 2 after
    assert resumed["g_optimizer"]["state"][0]["step"] == 4


def test_resume_runs_only_the_remaining_epochs(dataset_dir, tmp_path):
    run_workflow("train_autoencoder.json", **overrides(dataset_dir, tmp_path))
    seen = []
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(ROOT / "configs" / "train_autoencoder.json"),
        workflow_type="train",
        **overrides(
            dataset_dir,
            tmp_path,
            n_epochs=3,
            resume_from=str(tmp_path / "outputs" / "autoencoder" / "latest_checkpoint.pt"),
        ),
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append(e.state.epoch))
    workflow.run()
    workflow.finalize()
    assert seen == [2, 3]


def test_warm_up_keeps_the_adversarial_term_off(dataset_dir, tmp_path):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(ROOT / "configs" / "train_autoencoder.json"),
        workflow_type="train",
        **overrides(dataset_dir, tmp_path, n_epochs=2, autoencoder_warm_up_n_epochs=1, kl_weight=0.5),
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    disc = workflow.parser.get_parsed_content("discriminator")
    before = [p.detach().clone() for p in disc.parameters()]
    outputs = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: outputs.append((e.state.epoch, dict(e.state.output)))
    )
    snapshots = {}
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED,
        lambda e: snapshots.setdefault(e.state.epoch, [p.detach().clone() for p in disc.parameters()]),
    )
    workflow.run()
    workflow.finalize()
    warm = [o for epoch, o in outputs if epoch == 1]
    adversarial = [o for epoch, o in outputs if epoch == 2]
    assert warm and all(o["gen_adv_loss"] == 0 and o["disc_loss"] == 0 for o in warm)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshots[1]))  # the discriminator did not train
    assert adversarial and all(o["gen_adv_loss"] > 0 and o["disc_loss"] > 0 for o in adversarial)
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))
    # the weights from the config reach the loss: during warm-up, loss = recon + kl_weight * KL
    for o in warm:
        assert o["loss"] == pytest.approx(o["recon_loss"] + 0.5 * o["kl_loss"], rel=1e-5)


def test_loss_weights_reach_the_trainer_and_loss(dataset_dir, tmp_path):
    parser = ConfigParser()
    parser.read_config(ROOT / "configs" / "train_autoencoder.json")
    parser.update(
        overrides(
            dataset_dir,
            tmp_path,
            adv_weight=0.3,
            kl_weight=0.02,
            fg_weight=7.0,
            dice_weight=0.25,
            l1_weight=0.5,
            autoencoder_warm_up_n_epochs=4,
            device="$torch.device('cpu')",
        )
    )
    trainer = parser.get_parsed_content("train#trainer")
    assert (trainer.adv_weight, trainer.kl_weight, trainer.warm_up_epochs) == (0.3, 0.02, 4)
    loss = trainer.recon_loss
    assert (loss.fg_weight, loss.dice_weight, loss.l1_weight, loss.fg_l1_weight) == (7.0, 0.25, 0.5, 1.0)
    target = torch.zeros(1, 1, 4, 4, 4)
    target[..., 0, 0, 0] = 1.0
    pred = torch.zeros_like(target)
    # one missed foreground voxel of 64: l1 0.5/64 + weighted l1 7/64 + dice 0.25 * (1 - 1/2)
    assert loss(pred, target).item() == pytest.approx(0.5 / 64 + 7 / 64 + 0.25 * (1 - 1 / 2), rel=1e-5)


# a NaN loss weight set on the loss itself (the top-level fg_weight refuses NaN at start-up)
NAN_LOSS = {"train#recon_loss#fg_weight": math.nan}


def test_nan_loss_stops_and_keeps_the_last_good_checkpoints(dataset_dir, tmp_path):
    with pytest.raises(Exception) as info:
        run_workflow("train_autoencoder.json", **overrides(dataset_dir, tmp_path / "a", **NAN_LOSS))
    error = user_error(info.value)
    assert error is not None and "is nan at epoch 1, iteration 1" in str(error)
    assert not (tmp_path / "a" / "outputs" / "autoencoder" / "best_model.pt").exists()
    # a good first epoch, then a NaN in the second: both checkpoints stay those of epoch 1, byte for byte
    run_workflow("train_autoencoder.json", **overrides(dataset_dir, tmp_path / "b"))
    ckpt_dir = tmp_path / "b" / "outputs" / "autoencoder"
    before = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}
    with pytest.raises(Exception) as info:
        run_workflow(
            "train_autoencoder.json",
            **overrides(
                dataset_dir, tmp_path / "b", **NAN_LOSS, n_epochs=2, resume_from=str(ckpt_dir / "latest_checkpoint.pt")
            ),
        )
    assert "is nan at epoch 2, iteration 3" in str(user_error(info.value))
    assert {p.name: p.read_bytes() for p in ckpt_dir.iterdir()} == before


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"dataset_dir": "/nonexistent/voxels"}, "/nonexistent/voxels/train: no such training folder"),
        ({"voxel_size": 17}, r"voxel_size: \[17, 17, 17\] is not divisible by 2"),
        (
            {"discriminator_num_layers": 3, "batch_size": 1},
            "discriminator: num_layers_d=3 with norm BATCH does not fit",
        ),
        ({"perceptual_weights_path": "/nonexistent/resnet50.pth"}, "perceptual_weights_path does not exist"),
        ({"num_channels": [8, 12]}, r"norm_num_groups 8 does not divide channels \[12\]"),
    ],
)
def test_config_errors_are_one_line(dataset_dir, tmp_path, extra, message):
    data = extra.pop("dataset_dir", dataset_dir)
    with pytest.raises(Exception) as info:
        run_workflow("train_autoencoder.json", **overrides(data, tmp_path, **extra))
    error = user_error(info.value)
    assert error is not None, info.value
    assert re.search(message, str(error)) and "\n" not in str(error)
    assert not (tmp_path / "outputs").exists()


def test_empty_folder_and_non_volume_file_from_the_command_line(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    result = run_cli("train_autoencoder.json", **overrides(tmp_path / "data", tmp_path))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}/data/train: the training folder holds no .nii or .nii.gz volumes"
    )
    (tmp_path / "data" / "train" / "a.nii.gz").write_text("not a volume")
    with pytest.raises(Exception) as info:
        run_workflow("train_autoencoder.json", **overrides(tmp_path / "data", tmp_path))
    assert isinstance(user_error(info.value), UserError)
    assert "a.nii.gz: not a readable NIfTI volume" in str(user_error(info.value))


def test_volumes_of_different_boxes_are_refused_but_other_grid_sizes_are_resized(dataset_dir, tmp_path):
    import shutil

    from scripts.data.geometry import GridGeometry
    from scripts.data.nifti import load_nifti, save_nifti

    data = tmp_path / "data"
    shutil.copytree(dataset_dir, data)
    grid, geometry = load_nifti(next((data / "train").iterdir()))
    save_nifti(data / "train" / "zz_coarse.nii.gz", grid[::2, ::2, ::2], geometry.with_shape((8, 8, 8)))
    run_workflow("train_autoencoder.json", **overrides(data, tmp_path / "ok"))  # same box, other grid: resized
    shifted = GridGeometry(tuple(geometry.lo + 500.0), tuple(np.asarray(geometry.box_max_nm) + 500.0), geometry.shape)
    save_nifti(data / "train" / "zz_other.nii.gz", grid, shifted)
    with pytest.raises(Exception) as info:
        run_workflow("train_autoencoder.json", **overrides(data, tmp_path / "bad"))
    assert "zz_other.nii.gz: covers the box" in str(user_error(info.value))
    assert "different conversions cannot be mixed" in str(user_error(info.value))


def test_false_from_the_command_line_means_false(dataset_dir, tmp_path):
    settings = {k: v for k, v in overrides(dataset_dir, tmp_path).items() if k != "fast_dev_run"}
    result = run_cli("train_autoencoder.json", fast_dev_run="false", **settings)
    assert result.returncode == 0, result.stderr[-3000:]
    # all 6 training volumes at batch 2: 3 iterations, not fast_dev_run's 2
    assert load_checkpoint(tmp_path / "outputs" / "autoencoder" / "latest_checkpoint.pt")["iteration"] == 3


def test_overwrite_replaces_an_earlier_run_without_mixing_the_two(dataset_dir, tmp_path):
    run_workflow("train_autoencoder.json", **overrides(dataset_dir, tmp_path))
    ckpt_dir = tmp_path / "outputs" / "autoencoder"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best_model.pt", "latest_checkpoint.pt"]
    first = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}
    # a second run, other seed: its one epoch is before its first interval, so its best_model.pt comes from the
    # validation after the last epoch; each of its files replaces the first run's, none of which is left
    run_workflow("train_autoencoder.json", **overrides(dataset_dir, tmp_path, overwrite=True, val_interval=5, seed=3))
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best_model.pt", "latest_checkpoint.pt"]
    assert all((ckpt_dir / name).read_bytes() != data for name, data in first.items())
