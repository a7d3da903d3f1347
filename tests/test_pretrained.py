"""Fine-tuning from other weights (``--pretrained``): each training stage starts from the weights of a checkpoint or
of the shipped files, with a fresh epoch count and optimizer, and weights that do not fit are refused in one line."""

import re

import pytest
import torch
from conftest import ROOT, diffusion_overrides, initialized_workflow, overrides, run_cli, run_workflow, user_error
from scripts.networks.checkpoints import load_checkpoint


def _same_weights(network, state):
    return all(torch.equal(v.cpu(), state[k]) for k, v in network.state_dict().items())


def test_stage_1_starts_from_the_pretrained_weights_with_a_fresh_run(dataset_dir, autoencoder_ckpt, tmp_path):
    pretrained = load_checkpoint(autoencoder_ckpt, "autoencoder")
    workflow = initialized_workflow(
        "train_autoencoder.json", **overrides(dataset_dir, tmp_path, pretrained=str(autoencoder_ckpt))
    )
    try:
        assert _same_weights(workflow.parser.get_parsed_content("autoencoder"), pretrained["autoencoder"])
    finally:
        workflow.finalize()
    fresh = initialized_workflow("train_autoencoder.json", **overrides(dataset_dir, tmp_path / "fresh"))
    try:  # without pretrained the same config starts elsewhere: the check above can fail
        assert not _same_weights(fresh.parser.get_parsed_content("autoencoder"), pretrained["autoencoder"])
    finally:
        fresh.finalize()

    run_workflow("train_autoencoder.json", **overrides(dataset_dir, tmp_path, pretrained=str(autoencoder_ckpt)))
    tuned = load_checkpoint(tmp_path / "outputs" / "autoencoder" / "latest_checkpoint.pt", "autoencoder")
    assert tuned["epoch"] == 1 and tuned["g_optimizer"]["state"][0]["step"] == 2  # a new run, not a resumed one


def test_stage_2_starts_from_the_moving_average_of_the_pretrained_unet(
    dataset_dir, autoencoder_ckpt, model_dir, tmp_path
):
    source = model_dir / "diffusion" / "best_model.pt"
    pretrained = load_checkpoint(source, "diffusion")
    workflow = initialized_workflow(
        "train_diffusion.json", **diffusion_overrides(dataset_dir, autoencoder_ckpt, tmp_path, pretrained=str(source))
    )
    try:
        assert _same_weights(workflow.parser.get_parsed_content("unet"), pretrained["unet_ema"])
    finally:
        workflow.finalize()


@pytest.mark.parametrize(
    "stage, pretrained, message",
    [
        (
            "train_autoencoder.json",
            ROOT / "models" / "model_autoencoder.pt",  # the shipped [16, 32] autoencoder into the tiny [8, 16] one
            r"model_autoencoder\.pt: the autoencoder weights do not fit the network built from the config \(size "
            r"mismatch",
        ),
        ("train_diffusion.json", "AUTOENCODER", r"best_model\.pt: is a 'autoencoder' checkpoint, expected 'diffusion'"),
        ("train_autoencoder.json", "/nonexistent/model.pt", r"/nonexistent/model\.pt: pretrained names no such file"),
    ],
)
def test_weights_that_do_not_fit_are_refused_in_one_line(
    dataset_dir, autoencoder_ckpt, tmp_path, stage, pretrained, message
):
    pretrained = str(autoencoder_ckpt if pretrained == "AUTOENCODER" else pretrained)
    if stage == "train_autoencoder.json":
        settings = overrides(dataset_dir, tmp_path, pretrained=pretrained)
    else:
        settings = diffusion_overrides(dataset_dir, autoencoder_ckpt, tmp_path, pretrained=pretrained)
    result = run_cli(stage, **settings)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(message, last), result.stderr[-2000:]
    assert not (tmp_path / "outputs" / stage.split("_")[1].split(".")[0] / "latest_checkpoint.pt").exists()


def test_pretrained_and_resume_from_together_are_refused(dataset_dir, autoencoder_ckpt, tmp_path):
    with pytest.raises(Exception) as info:
        run_workflow(
            "train_autoencoder.json",
            **overrides(
                dataset_dir, tmp_path, pretrained=str(autoencoder_ckpt), resume_from=str(autoencoder_ckpt), n_epochs=2
            ),
        )
    error = user_error(info.value)
    assert error is not None and str(error).startswith("pretrained: ") and "set one" in str(error)
