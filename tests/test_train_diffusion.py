import re
import shutil

import pytest
import torch
from conftest import ROOT, diffusion_overrides, run_cli, run_workflow, user_error
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import Dataset
from monai.networks.nets import DiffusionModelUNet
from scripts.data.datasets import list_volumes, volume_transforms
from scripts.networks.checkpoints import load_checkpoint, save_checkpoint, weights_sha256
from scripts.networks.trained import frozen_autoencoder
from scripts.training.latents import compute_scale_factor, encode_volumes
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def test_config_defaults_build(dataset_dir, autoencoder_ckpt):
    parser = ConfigParser()
    parser.read_config(ROOT / "configs" / "train_diffusion.json")
    for key, value in {
        "num_channels": [32, 64, 64],
        "attention_levels": [False, True, True],
        "num_head_channels": [0, 64, 64],
        "num_train_timesteps": 1000,
        "scale_factor": None,
        "n_epochs": 500,
        "batch_size": 2,
    }.items():
        assert parser[key] == value, key
    assert parser["autoencoder_path"] == "$@bundle_root + '/outputs/autoencoder/best_model.pt'"
    parser.update({"autoencoder_path": str(autoencoder_ckpt), "device": "$torch.device('cpu')"})
    unet = parser.get_parsed_content("unet")
    assert isinstance(unet, DiffusionModelUNet)
    assert parser.get_parsed_content("latent_shape") == (3, 8, 8, 8)  # the tiny autoencoder halves 16³ once
    assert parser.get_parsed_content("voxel_size") == (16, 16, 16)  # taken from the stage-1 checkpoint


def test_fast_dev_run_checkpoints_samples_and_resume(dataset_dir, autoencoder_ckpt, tmp_path):
    result = run_cli("train_diffusion.json", **diffusion_overrides(dataset_dir, autoencoder_ckpt, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    # output to a pipe: one line per epoch, no progress-bar redraws
    assert "\r" not in result.stdout + result.stderr and re.search(
        r"^epoch 1/1: loss [0-9.e-]+ \(", result.stdout, re.M
    )
    ckpt_dir = tmp_path / "outputs" / "diffusion"
    latest = load_checkpoint(ckpt_dir / "latest_checkpoint.pt", "diffusion")
    best = load_checkpoint(ckpt_dir / "best_model.pt", "diffusion")
    assert latest["epoch"] == 1 and best["epoch"] == 1
    assert latest["scale_factor"] > 0 and latest["scheduler"]["num_train_timesteps"] == 100
    assert latest["autoencoder_weights_sha256"] == weights_sha256(load_checkpoint(autoencoder_ckpt)["autoencoder"])
    assert latest["network_config"]["unet"]["channels"] == [8, 16]
    assert latest["network_config"]["autoencoder"]["channels"] == [8, 16]
    assert latest["dataset_info"]["geometry"]["shape"] == [16, 16, 16]
    events = EventAccumulator(str(tmp_path / "logs" / "diffusion")).Reload()
    assert "samples/real_vs_generated" in events.Tags()["images"]
    assert {"train/diffusion_loss", "val_loss", "scale_factor"} <= set(events.Tags()["scalars"])

    # resume at the next epoch, keeping the stored scale factor even when asked to compute it differently
    seen = []
    workflow = ConfigWorkflow(
        config_file=str(ROOT / "configs" / "train_diffusion.json"),
        workflow_type="train",
        **diffusion_overrides(
            dataset_dir,
            autoencoder_ckpt,
            tmp_path,
            n_epochs=2,
            scale_factor_batches=1,
            resume_from=str(ckpt_dir / "latest_checkpoint.pt"),
        ),
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append(e.state.epoch))
    workflow.run()
    workflow.finalize()
    assert seen == [2]
    resumed = load_checkpoint(ckpt_dir / "latest_checkpoint.pt")
    assert resumed["epoch"] == 2 and resumed["scale_factor"] == latest["scale_factor"]
    assert trainer.scale_factor == latest["scale_factor"]


def test_scale_factor_override(dataset_dir, autoencoder_ckpt, tmp_path):
    run_workflow(
        "train_diffusion.json",
        **diffusion_overrides(dataset_dir, autoencoder_ckpt, tmp_path, scale_factor=0.5, generate_samples_interval=5),
    )
    assert load_checkpoint(tmp_path / "outputs" / "diffusion" / "latest_checkpoint.pt")["scale_factor"] == 0.5


def test_scale_factor_uses_the_configured_number_of_batches():
    # sigma 0: every latent equals its mean, so the factor is exactly 1/std of the first n_batches·batch_size means
    items = [{"z_mu": torch.full((1, 2, 2, 2), float(i) ** 2), "z_sigma": torch.zeros(1, 2, 2, 2)} for i in range(8)]
    for n_batches in (1, 2, 4):
        expected = 1 / torch.cat([it["z_mu"] for it in items[: 2 * n_batches]]).std().item()
        assert compute_scale_factor(Dataset(items), None, "cpu", n_batches, 2) == pytest.approx(expected)


def test_latent_cache_matches_on_the_fly_encoding(dataset_dir, autoencoder_ckpt, tmp_path):
    ckpt = load_checkpoint(autoencoder_ckpt)
    autoencoder = frozen_autoencoder(ckpt, autoencoder_ckpt, "cpu")
    datalist = list_volumes(dataset_dir / "train")[:3]
    transform = volume_transforms((16, 16, 16))
    cached = encode_volumes(autoencoder, datalist, transform, "cpu", batch_size=2, cache_dir=tmp_path, key="abc")
    files = sorted(tmp_path.rglob("*.pt"))
    assert len(files) == 3 and all(f.name.endswith("_0.pt") for f in files)
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = encode_volumes(autoencoder, datalist, transform, "cpu", batch_size=2, cache_dir=tmp_path, key="abc")
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # read back, not re-encoded
    with torch.no_grad():
        for (item,), (repeat,), d in zip(cached, again, datalist):
            z_mu, z_sigma = autoencoder.encode(transform(d)["image"][None])
            torch.testing.assert_close(item["z_mu"], z_mu[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(item["z_sigma"], z_sigma[0], rtol=1e-4, atol=1e-5)
            assert torch.equal(item["z_mu"], repeat["z_mu"])
    # another autoencoder (another key) does not reuse these latents
    encode_volumes(autoencoder, datalist[:1], transform, "cpu", cache_dir=tmp_path, key="xyz")
    assert len(sorted(tmp_path.rglob("*.pt"))) == 4


def test_disk_cache_and_on_the_fly_modes_train(dataset_dir, autoencoder_ckpt, tmp_path):
    for mode in ("disk", "none"):
        run_workflow(
            "train_diffusion.json",
            **diffusion_overrides(
                dataset_dir, autoencoder_ckpt, tmp_path / mode, latent_cache=mode, generate_samples_interval=5
            ),
        )
        assert (tmp_path / mode / "outputs" / "diffusion" / "best_model.pt").is_file()
    assert list((tmp_path / "disk" / "outputs" / "diffusion" / "latent_cache").rglob("*.pt"))


def test_missing_and_mismatched_autoencoder(dataset_dir, autoencoder_ckpt, tmp_path):
    result = run_cli("train_diffusion.json", **diffusion_overrides(dataset_dir, tmp_path / "none.pt", tmp_path))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}/none.pt: no such checkpoint; train stage 1 first: "
        "python -m monai.bundle run --config_file configs/train_autoencoder.json"
    )
    ckpt = load_checkpoint(autoencoder_ckpt)
    ckpt["network_config"]["autoencoder"]["channels"] = [16, 32]
    save_checkpoint(tmp_path / "other.pt", ckpt)
    with pytest.raises(Exception) as info:
        run_workflow("train_diffusion.json", **diffusion_overrides(dataset_dir, tmp_path / "other.pt", tmp_path))
    assert "other.pt: the autoencoder weights do not fit the network" in str(user_error(info.value))
    shutil.copy(autoencoder_ckpt, tmp_path / "ae.pt")
    run_workflow(
        "train_diffusion.json",
        **diffusion_overrides(dataset_dir, tmp_path / "ae.pt", tmp_path, generate_samples_interval=5),
    )
    with pytest.raises(Exception) as info:
        run_workflow(
            "train_diffusion.json",
            **diffusion_overrides(
                dataset_dir, tmp_path / "outputs" / "diffusion" / "best_model.pt", tmp_path / "again"
            ),
        )
    assert "is a 'diffusion' checkpoint, expected 'autoencoder'" in str(user_error(info.value))


def test_ema_weights_differ_from_the_raw_ones_resume_and_are_what_is_sampled(dataset_dir, autoencoder_ckpt, tmp_path):
    from scripts.networks.trained import trained_unet

    run_workflow("train_diffusion.json", **diffusion_overrides(dataset_dir, autoencoder_ckpt, tmp_path, ema_decay=0.5))
    ckpt_dir = tmp_path / "outputs" / "diffusion"
    ckpt = load_checkpoint(ckpt_dir / "latest_checkpoint.pt")
    raw, ema = ckpt["unet"], ckpt["unet_ema"]
    assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw)
    assert ckpt["lr_scheduler"]["last_epoch"] == 2  # warm-up and decay stepped once per iteration
    unet = trained_unet(ckpt, ckpt_dir / "latest_checkpoint.pt", "cpu")
    assert all(torch.equal(unet.state_dict()[k], ema[k]) for k in ema)  # sampling reads the EMA weights
    # resumed, the average continues from the saved one, not from a fresh copy of the raw weights
    run_workflow(
        "train_diffusion.json",
        **diffusion_overrides(
            dataset_dir,
            autoencoder_ckpt,
            tmp_path,
            ema_decay=0.5,
            n_epochs=2,
            resume_from=str(ckpt_dir / "latest_checkpoint.pt"),
        ),
    )
    resumed = load_checkpoint(ckpt_dir / "latest_checkpoint.pt")
    assert resumed["epoch"] == 2 and resumed["iteration"] == 4
    key = next(k for k in ema if ema[k].dtype.is_floating_point and not torch.equal(raw[k], ema[k]))
    # the resumed average moved from the saved one towards the new weights, so it is neither of them
    assert not torch.equal(resumed["unet_ema"][key], ema[key])
    assert not torch.equal(resumed["unet_ema"][key], resumed["unet"][key])


def test_augmented_latent_cache_holds_every_symmetry(dataset_dir, autoencoder_ckpt):
    from scripts.data.datasets import RandFlipRotated, symmetries
    from scripts.training.latents import LatentVariants, latent_items

    ckpt = load_checkpoint(autoencoder_ckpt)
    autoencoder = frozen_autoencoder(ckpt, autoencoder_ckpt, "cpu")
    datalist = list_volumes(dataset_dir / "train")[:2]
    transform = volume_transforms((16, 16, 16))
    augmentation = RandFlipRotated((16, 16, 16), (312.5, 300.0, 37.5))  # x and y not interchangeable: 4 elements
    dataset = latent_items("memory", autoencoder, datalist, transform, "cpu", 2, None, "k", augmentation)
    assert isinstance(dataset, LatentVariants) and [len(v) for v in dataset.items] == [4, 4]
    elements = symmetries((16, 16, 16), (312.5, 300.0, 37.5))
    with torch.no_grad():
        for element, variant in zip(elements, dataset.items[1]):
            image = element.grid(transform(datalist[1])["image"][None])
            torch.testing.assert_close(variant["z_mu"], autoencoder.encode(image)[0][0], rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    drawn = {id(dataset[0]) for _ in range(40)}
    assert len(drawn) == 4  # each access draws one of the four


def test_the_ddpm_objective_trains_resumes_and_samples_with_ddpm_and_ddim(
    dataset_dir, autoencoder_ckpt, model_dir, tmp_path
):
    run_workflow(
        "train_diffusion.json", **diffusion_overrides(dataset_dir, autoencoder_ckpt, tmp_path, objective="ddpm")
    )
    latest = tmp_path / "outputs" / "diffusion" / "latest_checkpoint.pt"
    run_workflow(
        "train_diffusion.json",
        **diffusion_overrides(
            dataset_dir, autoencoder_ckpt, tmp_path, objective="ddpm", n_epochs=2, resume_from=str(latest)
        ),
    )
    resumed = load_checkpoint(latest)
    assert resumed["epoch"] == 2 and resumed["scheduler"]["objective"] == "ddpm"
    models = tmp_path / "models"
    (models / "autoencoder").mkdir(parents=True)
    shutil.copy(autoencoder_ckpt, models / "autoencoder" / "best_model.pt")
    shutil.copytree(tmp_path / "outputs" / "diffusion", models / "diffusion")
    assert load_checkpoint(models / "diffusion" / "best_model.pt")["scheduler"]["objective"] == "ddpm"
    for kind in ("DDPM", "DDIM"):
        run_workflow(
            "inference.json",
            model_dir=str(models),
            output_dir=str(tmp_path / kind),
            num_samples=1,
            num_inference_steps=3,
            scheduler=kind,
        )
        assert (tmp_path / kind / "pointcloud" / "sample_0000.csv").is_file()
    with pytest.raises(Exception) as info:
        run_workflow("inference.json", model_dir=str(models), output_dir=str(tmp_path / "r"), scheduler="RFlow")
    assert "trained with the ddpm objective, which samples with DDIM or DDPM" in str(user_error(info.value))
    # and the other way round: the (default) rflow model refuses the ddpm samplers
    assert load_checkpoint(model_dir / "diffusion" / "best_model.pt")["scheduler"]["objective"] == "rflow"
    with pytest.raises(Exception) as info:
        run_workflow("inference.json", model_dir=str(model_dir), output_dir=str(tmp_path / "d"), scheduler="DDIM")
    error = user_error(info.value)
    assert "trained with the rflow objective, which samples with RFlow" in str(error) and "\n" not in str(error)


def test_logit_normal_timesteps_train_more_at_middle_noise_levels(dataset_dir, autoencoder_ckpt, tmp_path):
    from scripts.training.engines import draw_timesteps

    generator = torch.Generator().manual_seed(0)
    uniform = draw_timesteps(100_000, 1000, "uniform", generator)
    logit = draw_timesteps(100_000, 1000, "logit-normal", generator)
    assert 0 <= int(logit.min()) and int(logit.max()) <= 999
    middle = [float(((t >= 333) & (t < 667)).float().mean()) for t in (uniform, logit)]
    assert abs(middle[0] - 1 / 3) < 0.01 and middle[1] > 0.45  # sigmoid(N(0,1)) puts ~49 % in the middle third
    high = draw_timesteps(100_000, 1000, "high-noise", generator)
    assert 0 <= int(high.min()) and int(high.max()) <= 999
    above = [float((t >= 750).float().mean()) for t in (uniform, high)]  # shift 3: u > 1/2 lands above 0.75
    assert abs(above[0] - 0.25) < 0.01 and abs(above[1] - 0.5) < 0.01
    workflow = run_workflow(
        "train_diffusion.json",
        **diffusion_overrides(dataset_dir, autoencoder_ckpt, tmp_path, timestep_sampling="logit-normal"),
    )
    assert workflow.parser.get_parsed_content("train#trainer").timestep_sampling == "logit-normal"
    with pytest.raises(Exception) as info:
        run_workflow(
            "train_diffusion.json",
            **diffusion_overrides(dataset_dir, autoencoder_ckpt, tmp_path / "bad", timestep_sampling="lognormal"),
        )
    assert str(user_error(info.value)).startswith("timestep_sampling: expected one of")


def test_posterior_mean_latents_leave_out_the_encoders_noise(dataset_dir, autoencoder_ckpt, tmp_path):
    """``latent_draw: mean`` trains, validates and scales on the encoder's posterior means; 'sample' draws around
    them with the posterior's spread."""
    from scripts.training.latents import sample_latents

    mu, sigma = torch.randn(64, 3, 4, 4, 2), torch.full((64, 3, 4, 4, 2), 0.5)
    batch = {"z_mu": mu, "z_sigma": sigma}
    assert torch.equal(sample_latents(batch, None, "cpu", draw="mean"), mu)
    drawn = sample_latents(batch, None, "cpu", torch.Generator().manual_seed(0))
    assert (drawn - mu).std().item() == pytest.approx(0.5, rel=0.05)
    items = [{"z_mu": mu[i], "z_sigma": sigma[i]} for i in range(8)]
    mean_factor = compute_scale_factor(Dataset(items), None, "cpu", 4, 2, draw="mean")
    assert mean_factor == pytest.approx(1 / mu[:8].std().item())
    assert compute_scale_factor(Dataset(items), None, "cpu", 4, 2) < 0.95 * mean_factor  # the noise widens them

    workflow = run_workflow(
        "train_diffusion.json", **diffusion_overrides(dataset_dir, autoencoder_ckpt, tmp_path, latent_draw="mean")
    )
    assert workflow.parser.get_parsed_content("train#trainer").latent_draw == "mean"
    assert workflow.parser.get_parsed_content("validate#evaluator").latent_draw == "mean"
    assert load_checkpoint(tmp_path / "outputs" / "diffusion" / "latest_checkpoint.pt")["latent_draw"] == "mean"
    with pytest.raises(Exception) as info:
        run_workflow(
            "train_diffusion.json",
            **diffusion_overrides(dataset_dir, autoencoder_ckpt, tmp_path / "bad", latent_draw="means"),
        )
    assert str(user_error(info.value)).startswith("latent_draw: expected one of sample, mean, got 'means'")


def test_a_checkpoint_from_before_latent_draw_resumes_as_sample_and_a_mean_one_only_as_mean(
    dataset_dir, autoencoder_ckpt, tmp_path
):
    """Checkpoints written before ``latent_draw`` was recorded were trained on posterior draws: they resume with the
    default and are refused with ``mean``; a checkpoint trained on means is refused by a run that draws."""
    run_workflow("train_diffusion.json", **diffusion_overrides(dataset_dir, autoencoder_ckpt, tmp_path))
    latest = tmp_path / "outputs" / "diffusion" / "latest_checkpoint.pt"
    older = tmp_path / "older.pt"
    ckpt = load_checkpoint(latest)
    del ckpt["latent_draw"]
    save_checkpoint(older, ckpt)
    resumed = tmp_path / "resumed"
    run_workflow(
        "train_diffusion.json",
        **diffusion_overrides(dataset_dir, autoencoder_ckpt, resumed, n_epochs=2, resume_from=str(older)),
    )
    assert load_checkpoint(resumed / "outputs" / "diffusion" / "latest_checkpoint.pt")["epoch"] == 2
    run_workflow(
        "train_diffusion.json",
        **diffusion_overrides(dataset_dir, autoencoder_ckpt, tmp_path / "means", latent_draw="mean"),
    )
    means = tmp_path / "means" / "outputs" / "diffusion" / "latest_checkpoint.pt"
    for source, draw, stored in ((older, "mean", "sample"), (means, "sample", "mean")):
        with pytest.raises(Exception) as info:
            run_workflow(
                "train_diffusion.json",
                **diffusion_overrides(
                    dataset_dir,
                    autoencoder_ckpt,
                    tmp_path / "bad",
                    n_epochs=2,
                    resume_from=str(source),
                    latent_draw=draw,
                ),
            )
        assert re.match(
            rf"^{re.escape(str(source))}: was trained with latent_draw {stored}, but this run has {draw}",
            str(user_error(info.value)),
        )
