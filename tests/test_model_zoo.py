"""The bundle as the MONAI Model Zoo checks it (its ci/verify_bundle.py): layout, metadata, the shapes of both
networks, TorchScript export with the zoo's default arguments; and which weights sampling uses."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_workflow, user_error
from scripts.data.pointclouds import read_point_clouds
from scripts.networks.build import ExportableAutoencoder, ExportableUNet
from scripts.networks.checkpoints import load_checkpoint
from scripts.networks.trained import checkpoint_path, default_model_dir, publish
from scripts.runtime.errors import UserError

SCHEMA = ROOT.parent / "shared" / "schemas" / "meta_schema_20240725.json"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A copy of the bundle as the zoo holds it (tracked files, the shipped weights, no tests or outputs)."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    root = tmp_path_factory.mktemp("zoo") / "smlm_ldm"
    for name in listed:
        if (ROOT / name).is_file() and not name.startswith("tests/"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / name)
    return root


def _monai(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_zoo_layout_metadata_and_network_shapes(bundle):
    from monai.bundle import verify_metadata, verify_net_in_out

    for name in ("configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.json"):
        assert (bundle / name).is_file(), name
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    if SCHEMA.is_file():
        verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(SCHEMA))
    files = {"meta_file": str(bundle / "configs/metadata.json"), "config_file": str(bundle / "configs/inference.json")}
    # the UNet on latents alone (timesteps default to 0), at the symbolic sizes "4*n" for n = 1 and 2
    for n in (1, 2):
        verify_net_in_out(net_id="network_def", bundle_root=str(bundle), n=n, device="cpu", **files)
    verify_net_in_out(
        net_id="autoencoder_def",
        bundle_root=str(bundle),
        device="cpu",
        **files,
        **{"_meta_#network_data_format": meta["autoencoder_data_format"]},
    )


def test_ckpt_export_as_written_and_the_autoencoder(bundle):
    result = _monai(
        "ckpt_export", "--net_id", "network_def", "--filepath", "models/model.ts", "--config_file",
        "configs/inference.json", cwd=bundle,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    result = _monai(
        "ckpt_export", "--net_id", "autoencoder_def", "--ckpt_file", "models/model_autoencoder.pt", "--filepath",
        "models/model_autoencoder.ts", "--config_file", "configs/inference.json", cwd=bundle,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    unet_ckpt = load_checkpoint(bundle / "models" / "model.pt")
    unet = ExportableUNet(unet_ckpt["network_config"]["unet"], unet_ckpt["latent_shape"]).eval()
    unet.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    ae_ckpt = load_checkpoint(bundle / "models" / "model_autoencoder.pt")
    autoencoder = ExportableAutoencoder(ae_ckpt["network_config"]["autoencoder"], ae_ckpt["voxel_size"]).eval()
    autoencoder.load_state_dict(ae_ckpt["autoencoder"])
    ts_unet = torch.jit.load(str(bundle / "models" / "model.ts"))
    ts_autoencoder = torch.jit.load(str(bundle / "models" / "model_autoencoder.ts"))
    z, t = torch.randn(2, *unet_ckpt["latent_shape"]), torch.tensor([3, 700])
    x = torch.rand(1, 1, *ae_ckpt["voxel_size"])
    with torch.no_grad():
        torch.testing.assert_close(ts_unet(z, t), unet(z, t), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ts_unet(z), unet(z, torch.zeros(2, dtype=torch.long)), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ts_autoencoder(x), autoencoder.reconstruct(x), rtol=1e-4, atol=1e-4)


def test_trained_outputs_win_over_the_shipped_weights(model_dir, tmp_path):
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    assert default_model_dir(root) == str(root / "outputs")  # nothing anywhere: the missing checkpoint is named
    publish(model_dir, root / "models")
    assert default_model_dir(root) == str(root / "models")
    assert checkpoint_path(root / "models", "diffusion") == str(root / "models" / "model.pt")
    shutil.copytree(model_dir / "diffusion", root / "outputs" / "diffusion")
    shutil.copytree(model_dir / "autoencoder", root / "outputs" / "autoencoder")
    assert default_model_dir(root) == str(root / "outputs")
    assert checkpoint_path(root / "outputs", "diffusion") == str(root / "outputs" / "diffusion" / "best_model.pt")


def test_published_weights_sample_the_same_clouds(model_dir, tmp_path):
    written = publish(model_dir, tmp_path / "models")
    assert sorted(p.name for p in written) == ["checkpoints.json", "model.pt", "model_autoencoder.pt"]
    trained = load_checkpoint(model_dir / "diffusion" / "best_model.pt")
    shipped = load_checkpoint(tmp_path / "models" / "model.pt", "diffusion")
    key = "unet_ema" if "unet_ema" in trained else "unet"
    assert all(torch.equal(shipped["unet"][k], v) for k, v in trained[key].items())
    assert "optimizer" not in shipped and "files" not in shipped["dataset_info"]
    assert shipped["dataset_info"]["source"]["file"] == Path(trained["dataset_info"]["source"]["file"]).name
    assert str(model_dir.parent) not in (tmp_path / "models" / "checkpoints.json").read_text()
    common = {"num_samples": 2, "num_inference_steps": 3, "seed": 5, "preview": False}
    run_workflow("inference.json", model_dir=str(model_dir), output_dir=str(tmp_path / "a"), **common)
    run_workflow("inference.json", model_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "b"), **common)
    for name in ("sample_0000.csv", "sample_0001.csv"):
        a = read_point_clouds(tmp_path / "a" / "pointcloud" / name)[0][0]
        b = read_point_clouds(tmp_path / "b" / "pointcloud" / name)[0][0]
        assert len(a) > 0 and (a == b).all()


def test_the_sampling_default_recorded_with_the_weights_is_theirs_and_a_flag_overrides_it(model_dir, tmp_path):
    publish(model_dir, tmp_path / "models", eta=0)
    entry = json.loads((tmp_path / "models" / "checkpoints.json").read_text())["model.pt"]["checkpoint"]
    assert entry["sampling"] == {"eta": 0.0}
    common = {"num_samples": 2, "num_inference_steps": 3, "seed": 5, "preview": False}

    def points(name, **settings):
        run_workflow("inference.json", output_dir=str(tmp_path / name), **common, **settings)
        return read_point_clouds(tmp_path / name / "pointcloud" / "sample_0000.csv")[0][0]

    shipped = points("shipped", model_dir=str(tmp_path / "models"))
    euler = points("euler", model_dir=str(model_dir), eta=0)
    noisy = points("noisy", model_dir=str(model_dir))  # no record: the sampler's own default, fresh noise
    overridden = points("overridden", model_dir=str(tmp_path / "models"), eta=1)
    assert len(shipped) > 0 and shipped.shape == euler.shape and (shipped == euler).all()
    assert noisy.shape == overridden.shape and (noisy == overridden).all()
    assert noisy.shape != shipped.shape or not (noisy == shipped).all()
    with pytest.raises(UserError, match="eta: must be at most 1, got 2"):
        publish(model_dir, tmp_path / "models", overwrite=True, eta=2)
    ddpm = tmp_path / "ddpm"  # the same set, its stage 2 as if trained with noise prediction
    shutil.copytree(model_dir, ddpm)
    ckpt = torch.load(ddpm / "diffusion" / "best_model.pt", weights_only=False)
    ckpt["scheduler"]["objective"] = "ddpm"
    torch.save(ckpt, ddpm / "diffusion" / "best_model.pt")
    with pytest.raises(UserError, match="--eta: only rectified-flow sampling draws fresh noise; .* the ddpm objective"):
        publish(ddpm, tmp_path / "ddpm_models", eta=0)
    assert not (tmp_path / "ddpm_models").exists()


def test_publish_refuses_to_replace_and_tampered_weights_are_refused(model_dir, tmp_path):
    publish(model_dir, tmp_path / "models")
    with pytest.raises(UserError, match=r"models: already holds published weights \(.*\); pass --overwrite true"):
        publish(model_dir, tmp_path / "models")
    publish(model_dir, tmp_path / "models", overwrite=True)
    path = tmp_path / "models" / "model.pt"
    state = torch.load(path, weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 1  # a readable file whose weights are not the published ones
    torch.save(state, path)
    with pytest.raises(Exception) as info:
        run_workflow("inference.json", model_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "s"))
    error = user_error(info.value)
    assert error is not None and "SHA-256 differs from the one in" in str(error) and "\n" not in str(error)
    assert not (tmp_path / "s").exists()


def test_publishing_replaces_the_whole_set(model_dir, tmp_path):
    out = tmp_path / "models"
    shutil.copytree(ROOT / "models", out)  # the demo's set, with a fine stage
    with pytest.raises(UserError, match=r"refiner/best_model.pt: no such checkpoint, .*--without_refiner true"):
        publish(model_dir, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (ROOT / "models").iterdir())
    publish(model_dir, out, overwrite=True, without_refiner=True)
    assert sorted(p.name for p in out.iterdir()) == [
        ".manifest.json",
        "checkpoints.json",
        "model.pt",
        "model_autoencoder.pt",
    ]
    for name in ("model.pt", "model_autoencoder.pt"):
        load_checkpoint(out / name)  # each file matches its checkpoints.json entry
    (out / "model_refiner.pt").write_bytes((ROOT / "models" / "model_refiner.pt").read_bytes())
    with pytest.raises(
        UserError, match=r"json: has no entry for model_refiner.pt, .*; move .* away, or publish"
    ) as info:
        load_checkpoint(out / "model_refiner.pt")
    assert "re-download" not in str(info.value)
    with pytest.raises(UserError, match=r"model_refiner.pt: was not published with the set in .*; move it away"):
        publish(model_dir, out, overwrite=True, without_refiner=True)
