import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli, run_workflow, user_error
from monai.networks.schedulers import RFlowScheduler
from scripts.data.geometry import GridGeometry
from scripts.data.nifti import load_nifti
from scripts.data.pointclouds import read_point_clouds
from scripts.networks.build import ExportableAutoencoder, build_unet
from scripts.networks.checkpoints import load_checkpoint, save_checkpoint
from scripts.networks.schedulers import StochasticRFlowScheduler, make_scheduler
from scripts.runtime.errors import UserError

SMALL = {"num_samples": 3, "batch_size": 2, "num_inference_steps": 4}


def _sample(model_dir, out, **extra):
    return run_workflow("inference.json", model_dir=str(model_dir), output_dir=str(out), **{**SMALL, **extra})


def test_inference_writes_nifti_csv_preview_inside_the_training_box(model_dir, dataset_dir, tmp_path):
    result = run_cli("inference.json", model_dir=model_dir, output_dir=tmp_path / "s", **SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "s"
    names = [f"sample_{i:04d}" for i in range(3)]
    assert sorted(p.name for p in (out / "nifti").iterdir()) == [n + ".nii.gz" for n in names]
    assert sorted(p.name for p in (out / "pointcloud").iterdir()) == [n + ".csv" for n in names]
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    box = GridGeometry.from_dict(json.loads((dataset_dir / "dataset_info.json").read_text())["geometry"])
    for name in names:
        assert (out / "pointcloud" / f"{name}.csv").read_text().splitlines()[0] == '"x [nm]","y [nm]","z [nm]"'
        points, _ = read_point_clouds(out / "pointcloud" / f"{name}.csv")
        assert len(points[0]) > 0 and box.inside(points[0]).all()
        grid, geometry = load_nifti(out / "nifti" / f"{name}.nii.gz")
        assert grid.shape == (16, 16, 16) and grid.min() >= 0 and grid.max() <= 1
        np.testing.assert_allclose(geometry.box_min_nm, box.box_min_nm, atol=1e-2)
        np.testing.assert_allclose(geometry.box_max_nm, box.box_max_nm, atol=1e-2)


def test_same_seed_same_files_other_seed_other_files(model_dir, tmp_path):
    # the default objective and sampler: rectified flow (RFlow Euler steps)
    assert load_checkpoint(model_dir / "diffusion" / "best_model.pt")["scheduler"]["objective"] == "rflow"
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        _sample(model_dir, tmp_path / name, seed=seed, output_formats=["nifti", "csv", "h5"])
    csv = "pointcloud/sample_0001.csv"
    assert (tmp_path / "a" / csv).read_bytes() == (tmp_path / "b" / csv).read_bytes()
    assert (tmp_path / "a" / csv).read_bytes() != (tmp_path / "c" / csv).read_bytes()
    a = nib.load(tmp_path / "a" / "nifti" / "sample_0002.nii.gz").get_fdata()
    assert np.array_equal(a, nib.load(tmp_path / "b" / "nifti" / "sample_0002.nii.gz").get_fdata())
    clouds, _ = read_point_clouds(tmp_path / "a" / "pointcloud" / "samples.h5")
    assert len(clouds) == 3


def test_num_points_and_export_method(model_dir, tmp_path):
    _sample(model_dir, tmp_path / "p", num_points=500, method="probabilistic", threshold=0.0, num_samples=1)
    assert len(read_point_clouds(tmp_path / "p" / "pointcloud" / "sample_0000.csv")[0][0]) == 500
    _sample(model_dir, tmp_path / "c", method="center", threshold=0.0, num_samples=1)
    points = read_point_clouds(tmp_path / "c" / "pointcloud" / "sample_0000.csv")[0][0]
    grid, _ = load_nifti(tmp_path / "c" / "nifti" / "sample_0000.nii.gz")
    assert len(points) == np.count_nonzero(grid > 0)  # one point per voxel above the threshold
    _sample(model_dir, tmp_path / "d", method="center", num_samples=1)  # a voxel export's default threshold: 0.1
    points = read_point_clouds(tmp_path / "d" / "pointcloud" / "sample_0000.csv")[0][0]
    assert len(points) == np.count_nonzero(grid > 0.1) < np.count_nonzero(grid > 0)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_autoencoder", "autoencoder/best_model.pt: no such checkpoint; train stage 1 first"),
        ("missing_diffusion", "diffusion/best_model.pt: no such checkpoint; train stage 2 first"),
        ("other_autoencoder", "was trained on other autoencoder weights"),
        ("no_geometry", "holds no data geometry"),
        ("num_samples", "num_samples: must be 1 or more, got 0"),
        ("output_is_file", "output_dir exists and is not a folder"),
    ],
)
def test_inference_errors(model_dir, tmp_path, case, message):
    models, out, extra = tmp_path / "models", tmp_path / "out", {}
    for stage in ("autoencoder", "diffusion"):
        (models / stage).mkdir(parents=True)
        if case != f"missing_{stage}":
            (models / stage / "best_model.pt").write_bytes((model_dir / stage / "best_model.pt").read_bytes())
    if case == "other_autoencoder":
        ckpt = load_checkpoint(models / "autoencoder" / "best_model.pt")
        ckpt["autoencoder"] = {k: v + 0.01 for k, v in ckpt["autoencoder"].items()}
        save_checkpoint(models / "autoencoder" / "best_model.pt", ckpt)
    if case == "no_geometry":
        ckpt = load_checkpoint(models / "diffusion" / "best_model.pt")
        ckpt.pop("dataset_info")
        save_checkpoint(models / "diffusion" / "best_model.pt", ckpt)
    if case == "num_samples":
        extra["num_samples"] = 0
    if case == "output_is_file":
        out.write_text("a file")
    with pytest.raises(Exception) as info:
        run_workflow("inference.json", model_dir=str(models), output_dir=str(out), **{**SMALL, **extra})
    assert message in str(user_error(info.value)), info.value
    assert not (out / "nifti").exists()
    assert sorted(p.name for p in (models / "diffusion").iterdir()) in ([], ["best_model.pt"])


def _export(net_id, model_dir, stage, key, path):
    result = run_cli_export(net_id, model_dir / stage / "best_model.pt", key, path, model_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.jit.load(str(path))


def run_cli_export(net_id, ckpt_file, key, filepath, model_dir):
    import subprocess
    import sys

    return subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "ckpt_export",
            "--net_id",
            net_id,
            "--filepath",
            str(filepath),
            "--ckpt_file",
            str(ckpt_file),
            "--key_in_ckpt",
            key,
            "--config_file",
            "configs/inference.json",
            "--meta_file",
            "configs/metadata.json",
            "--model_dir",
            str(model_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_torchscript_export_matches_eager(model_dir, tmp_path):
    ae_ckpt = load_checkpoint(model_dir / "autoencoder" / "best_model.pt")
    df_ckpt = load_checkpoint(model_dir / "diffusion" / "best_model.pt")
    autoencoder = ExportableAutoencoder(ae_ckpt["network_config"]["autoencoder"], ae_ckpt["voxel_size"]).eval()
    autoencoder.load_state_dict(ae_ckpt["autoencoder"])
    unet = build_unet(df_ckpt["network_config"]["unet"]).eval()
    unet.load_state_dict(df_ckpt["unet"])
    ts_autoencoder = _export("autoencoder_def", model_dir, "autoencoder", "autoencoder", tmp_path / "autoencoder.ts")
    ts_unet = _export("network_def", model_dir, "diffusion", "unet", tmp_path / "unet.ts")
    x = torch.rand(2, 1, 16, 16, 16)
    z, t = torch.randn(2, *df_ckpt["latent_shape"]), torch.tensor([3, 70])
    with torch.no_grad():
        torch.testing.assert_close(ts_autoencoder(x), autoencoder(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ts_unet(z, t), unet(z, timesteps=t), rtol=1e-4, atol=1e-4)


def test_metadata_is_valid_against_the_schema():
    schema = ROOT.parent / "shared" / "schemas" / "meta_schema_20240725.json"
    if not schema.is_file():
        pytest.skip(f"{schema} is not beside the repository")
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(ROOT / "configs" / "metadata.json"), filepath=str(schema))


def test_network_shapes_match_the_metadata(model_dir, tmp_path):
    from scripts.runtime.errors import UserError
    from scripts.verify_networks import verify_networks

    lines = verify_networks(model_dir, ROOT / "configs" / "metadata.json")
    assert len(lines) == 5 and all(line.endswith("ok") for line in lines)
    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    meta["network_data_format"]["inputs"]["image"]["num_channels"] = 4
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="diffusion input has 3 channels, the metadata says 4"):
        verify_networks(model_dir, tmp_path / "meta.json")


def test_overwrite_replaces_an_earlier_run_without_mixing_the_two(model_dir, tmp_path):
    out = tmp_path / "s"
    _sample(model_dir, out, num_samples=3, output_formats=["nifti", "csv", "h5"])
    (out / "pointcloud" / "my_notes.txt").write_text("keep me")
    _sample(model_dir, out, num_samples=1, overwrite=True, seed=5)
    assert sorted(p.name for p in (out / "nifti").iterdir()) == ["sample_0000.nii.gz"]
    assert sorted(p.name for p in (out / "pointcloud").iterdir()) == ["my_notes.txt", "sample_0000.csv"]
    manifest = json.loads((out / ".manifest.json").read_text())["files"]
    assert manifest == ["nifti/sample_0000.nii.gz", "pointcloud/sample_0000.csv", "preview.png"]
    assert not list(out.glob(".staging-*"))


def test_false_from_the_command_line_means_false(model_dir, tmp_path):
    result = run_cli("inference.json", model_dir=model_dir, output_dir=tmp_path / "s", preview="false", **SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    # output to a pipe: a line per block of batches, no progress-bar redraws
    assert "\r" not in result.stdout + result.stderr and "sampling: 2/2 batches" in result.stdout
    assert not (tmp_path / "s" / "preview.png").exists() and (tmp_path / "s" / "nifti").is_dir()


def test_each_sample_is_written_as_it_is_made_and_none_is_kept(model_dir, tmp_path):
    """Memory does not grow with num_samples: a sample's cloud is written (CSV and HDF5) and let go before the next
    is made, and the HDF5 file holds what the CSVs hold."""
    import weakref

    from scripts.networks import trained as weights
    from scripts.sampling.sampler import Sampler

    ae_path, dm_path = (weights.checkpoint_path(model_dir, stage) for stage in ("autoencoder", "diffusion"))
    ae_ckpt = weights.load_autoencoder_checkpoint(ae_path)
    ckpt = weights.load_diffusion_checkpoint(dm_path, ae_ckpt, ae_path)
    networks = weights.frozen_autoencoder(ae_ckpt, ae_path, "cpu"), weights.trained_unet(ckpt, dm_path, "cpu")
    out = tmp_path / "s"
    sampler = Sampler(
        *networks,
        ckpt,
        out,
        num_samples=5,
        batch_size=2,
        denoising={"num_inference_steps": 2},
        export={"num_points": 300, "threshold": 0.0, "output_formats": ("csv", "h5")},
    )
    written, write = [], sampler._write

    def tracked(folder, i, grid):
        assert all(ref() is None for ref in written), f"sample {i}: an earlier cloud is still held"
        points = write(folder, i, grid)
        written.append(weakref.ref(points))
        return points

    sampler._write = tracked
    assert sampler.run() is None
    assert len(written) == 5 and all(ref() is None for ref in written)
    clouds, _ = read_point_clouds(out / "pointcloud" / "samples.h5")
    assert len(clouds) == 5 and (out / "preview.png").is_file()
    for i, cloud in enumerate(clouds):
        csv = read_point_clouds(out / "pointcloud" / f"sample_{i:04d}.csv")[0][0]
        assert len(csv) == 300
        np.testing.assert_allclose(cloud, csv, atol=2e-3)  # float32 in HDF5, 0.001 nm in CSV


RFLOW = {"objective": "rflow", "num_train_timesteps": 1000}


def _denoise(scheduler, velocity, x, below=None):
    """The inferer's loop over ``scheduler``'s steps (only those from noise levels above ``below``, if given)."""
    following = torch.cat((scheduler.timesteps[1:], torch.tensor([0])))
    for t, next_t in zip(scheduler.timesteps, following):
        if below is None or t / 1000 > below:
            x, _ = scheduler.step(velocity(x, float(t) / 1000), t, x, next_t)
    return x


def _gaussian_velocity(spread):
    """The exact rectified-flow velocity of data drawn from N(0, spread²): E[x_0 - n | x_t]."""

    def velocity(x, t):
        return ((1 - t) * spread**2 - t) / ((1 - t) ** 2 * spread**2 + t**2) * x

    return velocity


def test_stochastic_rflow_steps_renoise_late_steps_only_and_are_seeded():
    velocity, start = _gaussian_velocity(0.5), torch.randn((4000, 3, 2, 2), generator=torch.Generator().manual_seed(0))

    def run(eta, eta_below, seed, **kw):
        scheduler = make_scheduler(RFLOW, None, 20, eta, eta_below, torch.Generator().manual_seed(seed))
        return _denoise(scheduler, velocity, start.clone(), **kw)

    # eta 0 is MONAI's Euler step (make_scheduler then builds MONAI's own)
    assert type(make_scheduler(RFLOW, "RFlow", 20, 0.0)) is RFlowScheduler
    stochastic = StochasticRFlowScheduler(1000, 0.0, 1.0, use_discrete_timesteps=True, sample_method="uniform")
    stochastic.set_timesteps(20)
    euler = _denoise(make_scheduler(RFLOW, None, 20, 0.0), velocity, start.clone())
    torch.testing.assert_close(_denoise(stochastic, velocity, start.clone()), euler, atol=1e-5, rtol=1e-5)
    # the steps above eta_below are deterministic; the late ones draw fresh noise, seeded by the generator
    assert torch.equal(run(1.0, 0.5, 1, below=0.5), run(1.0, 0.5, 2, below=0.5))
    assert torch.equal(run(1.0, 0.5, 1), run(1.0, 0.5, 1))
    a, b = run(1.0, 0.5, 1), run(1.0, 0.5, 2)
    assert not torch.allclose(a, b)
    # with eta 1 the late steps forget the start noise's fine detail: two seeds' samples of one start noise correlate
    # far less than Euler's path would allow (it gives one sample per start noise)
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] < 0.9
    # Euler's steps keep the data's spread (exact velocity: within 10 % at 20 steps); the late re-noising narrows it,
    # as a lower sampling temperature does
    assert abs(euler.std() - 0.5) < 0.05
    assert a.std() < euler.std()


def test_eta_is_for_rflow_sampling_only():
    ddpm = {"objective": "ddpm", "num_train_timesteps": 1000, "schedule": "scaled_linear_beta"}
    ddpm.update(beta_start=0.0015, beta_end=0.0195)
    for eta, eta_below in ((0.5, None), (None, 0.5)):
        with pytest.raises(UserError, match="only RFlow sampling draws fresh noise"):
            make_scheduler(ddpm, None, 10, eta, eta_below)
    assert make_scheduler(ddpm, None, 10).__class__.__name__ == "DDIMScheduler"


def test_eta_out_of_range_is_refused_in_one_line(model_dir, tmp_path):
    with pytest.raises(Exception) as info:
        _sample(model_dir, tmp_path / "out", eta=1.5)
    assert str(user_error(info.value)).startswith("eta: "), info.value
    assert not (tmp_path / "out" / "nifti").exists()
