"""Training on patches of grids larger than the patch: stage 1 on random patches validated on whole grids by sliding
window, stage 2 on latents encoded by sliding window and cropped to the latent of the patch."""

import pytest
import torch
from conftest import ROOT, diffusion_overrides, overrides, run_cli, run_workflow, user_error
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow
from scripts.data.datasets import list_volumes, volume_transforms
from scripts.networks.checkpoints import load_checkpoint
from scripts.networks.trained import frozen_autoencoder
from scripts.training.engines import SlidingWindowReconstruction
from scripts.training.latents import SlidingWindowEncoder, _aligned_overlap, encode_volumes

GRID, PATCH = [32, 32, 16], [16, 16, 16]  # the tiny dataset's 16³ volumes resized to a grid of two by two patches


def _workflow(config, **settings):
    workflow = ConfigWorkflow(config_file=str(ROOT / "configs" / config), workflow_type="train", **settings)
    workflow.initialize()
    return workflow


@pytest.fixture(scope="module")
def patch_autoencoder(dataset_dir, tmp_path_factory):
    """A stage-1 checkpoint of the tiny autoencoder trained for one fast epoch on 16³ patches of 32×32×16 grids."""
    out = tmp_path_factory.mktemp("patch_stage1")
    run_workflow("train_autoencoder.json", **overrides(dataset_dir, out, voxel_size=GRID, patch_size=16))
    return out / "outputs" / "autoencoder" / "best_model.pt"


def test_patch_training_validates_whole_grids_and_resumes(dataset_dir, tmp_path):
    settings = overrides(dataset_dir, tmp_path, voxel_size=GRID, patch_size=16)
    workflow = _workflow("train_autoencoder.json", **settings)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    trained, validated = [], []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: trained.append(tuple(e.state.output["image"].shape))
    )
    evaluator.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: validated.extend(tuple(o["pred"].shape) for o in e.state.output)
    )
    workflow.run()
    workflow.finalize()
    assert trained == [(2, 1, *PATCH)] * 2  # random patches in training
    assert validated and set(validated) == {(1, *GRID)}  # whole grids, reconstructed window by window, in validation
    latest = tmp_path / "outputs" / "autoencoder" / "latest_checkpoint.pt"
    ckpt = load_checkpoint(latest, "autoencoder")
    assert ckpt["epoch"] == 1 and list(ckpt["patch_size"]) == PATCH and list(ckpt["voxel_size"]) == GRID

    resumed = _workflow("train_autoencoder.json", **dict(settings, n_epochs=2, resume_from=str(latest)))
    seen = []
    resumed.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.EPOCH_STARTED, lambda e: seen.append(e.state.epoch)
    )
    resumed.run()
    resumed.finalize()
    ckpt = load_checkpoint(latest)
    assert seen == [2] and ckpt["epoch"] == 2 and ckpt["iteration"] == 4 and list(ckpt["patch_size"]) == PATCH
    # another patch size is another training: refused at start-up, naming the setting
    with pytest.raises(Exception) as info:
        _workflow("train_autoencoder.json", **dict(settings, patch_size=8, n_epochs=3, resume_from=str(latest)))
    error = str(user_error(info.value))
    assert "was trained with patch_size [16, 16, 16], but this run has [8, 8, 8]" in error and "\n" not in error


class _Pointwise(torch.nn.Module):
    """A stand-in autoencoder whose reconstruction is local (voxel by voxel)."""

    def reconstruct(self, x):
        return torch.sigmoid(3 * x - 1)


def test_sliding_window_reconstruction_matches_the_whole_grid_where_the_network_is_local(
    dataset_dir, patch_autoencoder
):
    images = torch.stack([volume_transforms((40, 16, 16))(d)["image"] for d in list_volumes(dataset_dir / "val")])
    # windows of 16 at overlap 0.25 start at x = 0, 12, 24: blended where two overlap, alone elsewhere
    inferer = SlidingWindowReconstruction((16, 16, 16), sw_batch_size=2, overlap=0.25)
    pointwise = _Pointwise()
    torch.testing.assert_close(inferer(images, pointwise), pointwise.reconstruct(images), rtol=0, atol=1e-6)
    autoencoder = frozen_autoencoder(load_checkpoint(patch_autoencoder), patch_autoencoder, "cpu")
    with torch.no_grad():
        tiled = inferer(images, autoencoder)
        torch.testing.assert_close(  # a grid of one window is reconstructed as a whole
            inferer(images[..., :16, :, :], autoencoder),
            autoencoder.reconstruct(images[..., :16, :, :]),
            atol=1e-5,
            rtol=0,
        )
        for start, alone in ((0, range(0, 12)), (12, range(16, 24)), (24, range(28, 40))):
            window = autoencoder.reconstruct(images[..., start : start + 16, :, :])
            torch.testing.assert_close(
                tiled[..., alone, :, :], window[..., [x - start for x in alone], :, :], atol=1e-5, rtol=0
            )
        # GroupNorm's statistics span the whole input, so the whole-grid reconstruction is another function of the
        # grid: measured max |difference| 3.7 (1 epoch) and 0.2 (150 epochs) on these grids, not a tolerance


def test_window_strides_are_whole_latent_voxels():
    for roi in (8, 16, 24, 48):
        for overlap in (0.0, 0.1, 0.25, 0.3, 0.5, 0.6):
            for factor in (2, 4):
                aligned = _aligned_overlap(roi, overlap, factor)
                stride = int(roi * (1 - aligned))  # as MONAI's sliding window takes it
                largest = int(roi * (1 - overlap)) // factor * factor  # no less overlap than asked for
                assert 0 <= aligned < 1 and stride == max(factor, largest), (roi, overlap, factor)


def test_stage2_on_a_patch_trained_autoencoder_encodes_by_windows_and_trains_on_latent_patches(
    dataset_dir, patch_autoencoder, tmp_path
):
    autoencoder = frozen_autoencoder(load_checkpoint(patch_autoencoder), patch_autoencoder, "cpu")
    encoder = SlidingWindowEncoder(autoencoder, PATCH, sw_batch_size=4, overlap=0.25)
    datalist = list_volumes(dataset_dir / "train")[:2]
    transform = volume_transforms(GRID)
    items = encode_volumes(encoder, datalist, transform, "cpu")
    assert [tuple(v["z_mu"].shape) for (v,) in items] == [(3, 16, 16, 8)] * 2  # the whole grid's latent
    with torch.no_grad():  # windows at x, y = 0, 12, 16 (latent 0, 6, 8): latent [0, 6)² is the first window's alone
        z_mu, z_sigma = autoencoder.encode(transform(datalist[0])["image"][None, ..., :16, :16, :])
    torch.testing.assert_close(items[0][0]["z_mu"][:, :6, :6], z_mu[0, :, :6, :6], atol=1e-5, rtol=0)
    torch.testing.assert_close(items[0][0]["z_sigma"][:, :6, :6], z_sigma[0, :, :6, :6], atol=1e-5, rtol=0)

    settings = diffusion_overrides(dataset_dir, patch_autoencoder, tmp_path, generate_samples_interval=1)
    workflow = _workflow("train_diffusion.json", **settings)
    train, val = (workflow.parser.get_parsed_content(f"{s}#dataset") for s in ("train", "validate"))
    assert tuple(train.items[0][0]["z_mu"].shape) == (3, 16, 16, 8)
    torch.manual_seed(0)
    crops = [train[0] for _ in range(6)]
    assert all(c["z_mu"].shape == c["z_sigma"].shape == (3, 8, 8, 8) for c in crops)
    assert len({tuple(c["z_mu"].flatten()[:4].tolist()) for c in crops}) > 1  # random windows
    assert torch.equal(val[0]["z_mu"], val[0]["z_mu"]) and val[0]["z_mu"].shape == (3, 8, 8, 8)  # the centre
    workflow.run()
    workflow.finalize()
    latest = tmp_path / "outputs" / "diffusion" / "latest_checkpoint.pt"
    ckpt = load_checkpoint(latest, "diffusion")
    assert tuple(ckpt["latent_shape"]) == (3, 8, 8, 8)  # the tile the sampler covers a field with
    assert list(ckpt["voxel_size"]) == GRID and ckpt["epoch"] == 1 and ckpt["scale_factor"] > 0

    run_workflow("train_diffusion.json", **dict(settings, n_epochs=2, resume_from=str(latest)))
    resumed = load_checkpoint(latest)
    assert resumed["epoch"] == 2 and resumed["iteration"] == 4 and resumed["scale_factor"] == ckpt["scale_factor"]


def test_latent_patch_size_sets_the_training_latent(dataset_dir, patch_autoencoder, tmp_path):
    parser = ConfigParser()
    parser.read_config(ROOT / "configs" / "train_diffusion.json")
    parser.update(diffusion_overrides(dataset_dir, patch_autoencoder, tmp_path, device="$torch.device('cpu')"))
    assert parser.get_parsed_content("latent_shape") == (3, 8, 8, 8)  # the stage-1 patch's latent
    parser["latent_patch_size"] = [16, 16, 8]
    assert parser.get_parsed_content("latent_shape", lazy=False) == (3, 16, 16, 8)  # whole latents
    with pytest.raises(Exception) as info:
        run_workflow(
            "train_diffusion.json",
            **diffusion_overrides(dataset_dir, patch_autoencoder, tmp_path, latent_patch_size=32),
        )
    error = str(user_error(info.value))
    assert error.startswith("latent_patch_size: [32, 32, 32] is larger than the latent") and "\n" not in error
    with pytest.raises(Exception) as info:  # encoding at every step takes whole grids only
        run_workflow(
            "train_diffusion.json", **diffusion_overrides(dataset_dir, patch_autoencoder, tmp_path, latent_cache="none")
        )
    assert str(user_error(info.value)).startswith("latent_cache: 'none' encodes whole grids at every step")


@pytest.mark.parametrize(
    "patch_size, message",
    [
        (32, "patch_size: [32, 32, 32] is larger than the grid (voxel_size [16, 16, 16]) on some axis"),
        (9, "patch_size: [9, 9, 9] is not divisible by 2, which the autoencoder's 1 downsamplings need"),
    ],
)
def test_a_bad_patch_size_is_one_line(dataset_dir, tmp_path, patch_size, message):
    result = run_cli("train_autoencoder.json", **overrides(dataset_dir, tmp_path, patch_size=patch_size))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), result.stderr[-3000:]
    assert not (tmp_path / "outputs").exists()
