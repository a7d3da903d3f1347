"""The stage-2 scaling benchmark's smoke run (``--quick``): a tiny row trains to two milestones, resuming between
them, and each milestone is sampled, scored and checked for copies; a second run reads the milestones back; the
layout benchmark then reads them, and the voxel-space stage 2 trains on the row's conversion and is scored the same
way."""

import json
import os
import subprocess
import sys

import numpy as np
from conftest import ROOT
from scripts.data.pointclouds import read_point_clouds


def test_scaling_benchmark_quick_trains_resumes_scores_and_reuses(tmp_path):
    command = [sys.executable, "benchmarks/benchmark_stage2_scaling.py", "--quick", "--work_dir", str(tmp_path)]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    row = tmp_path / "n16_aug"  # 16 training clouds (and 4 for validation)
    minutes = json.loads((row / "minutes.json").read_text())
    assert set(minutes) == {"4", "8"}
    train_log = (row / "train.log").read_text()
    assert "--resume_from" in train_log.split("--n_epochs 4")[-1]  # the second milestone resumed the first
    for step in (4, 8):
        result_file = json.loads((row / f"step{step}" / "result.json").read_text())
        assert {"train_vs_heldout", "mean_grid_baseline", "samples"} >= set(result_file["rows"])
        memo = result_file["memorisation"]
        assert memo["n"] == 10 and 0 <= memo["copies"] <= 10 and 0 < memo["sample_ratio"] <= 1
        assert (row / f"step{step}" / "evaluation" / "renderings.png").is_file()
    report = (tmp_path / "report.md").read_text()
    assert report.count("| 16 | on | ") == 2 and "floor: training clouds" in report
    assert "| 16 clouds, on, 8 steps | " in report.split("C2ST on each statistic alone")[1]
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and (row / "train.log").read_text() == train_log  # nothing trained again
    # the kept milestones sampled again with other settings: their own folders and rows, nothing trained
    other = subprocess.run(
        command + ["--sampler", "eta=1", "--sampler", "eta_below=0.5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert other.returncode == 0, other.stdout[-2000:] + other.stderr[-2000:]
    assert (row / "step4_eta-1_eta_below-0.5" / "result.json").is_file() and "sampled with eta=1" in other.stdout
    assert (row / "train.log").read_text() == train_log
    layout = [sys.executable, "benchmarks/benchmark_stage2_layout.py", "--quick", "--work_dir", str(tmp_path)]
    layout += ["--figure", str(tmp_path / "flow.png"), "--figure_of", "n16_aug step4"]
    result = subprocess.run(layout, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "| n16_aug step4 / n16_aug step8 | " in result.stdout  # the two milestones' samples, same noise
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| n16_aug step")]
    gauss = [cells for cells in rows if len(cells) == 6 and "/" not in cells[1]]  # per checkpoint: its Gaussian flow
    assert len(gauss) == 2 and all(-1 <= float(cells[2]) <= 1 for cells in gauss)
    errors = [cells[2:-1] for cells in rows if len(cells) == 8]  # and its denoising error beside the Gaussian's
    assert len(errors) == 2 and all(
        0 < float(cell.split("/")[1].split()[0]) < 1.5 for cells in errors for cell in cells
    )
    assert (tmp_path / "flow.png").stat().st_size > 0
    designs = [sys.executable, "benchmarks/benchmark_stage2_designs.py", "--quick", "--work_dir", str(tmp_path / "px")]
    designs += ["--dataset_dir", str(tmp_path / "data16" / "voxels_nifti")]
    designs += ["--reference_file", str(tmp_path / "test_clouds.h5")]
    result = subprocess.run(designs, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "| 16 | on (voxel space) | 4 | " in result.stdout and "floor: training clouds" in result.stdout
    info = json.loads((tmp_path / "data16" / "voxels_nifti" / "dataset_info.json").read_text())["geometry"]
    clouds, _ = read_point_clouds(tmp_path / "px" / "samples" / "pointcloud" / "samples.h5")
    assert len(clouds) == 4 and all(len(c) for c in clouds)
    for cloud in clouds:  # the fine stage placed the voxel-space samples' points inside the training box
        assert (cloud.min(0) >= np.array(info["box_min_nm"]) - 1e-3).all()
        assert (cloud.max(0) <= np.array(info["box_max_nm"]) + 1e-3).all()
    trained = (tmp_path / "px" / "stage2.pt").stat().st_mtime_ns
    latent = tmp_path / "n16_aug" / "step4" / "evaluation" / "renderings.png"
    beside = ["--figure", str(tmp_path / "px.png"), "--beside", f"latent, 4 steps={latent}"]
    again = subprocess.run(designs + beside, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "| 16 | on (voxel space) | 4 | " in again.stdout  # the same row, read back
    assert (tmp_path / "px" / "stage2.pt").stat().st_mtime_ns == trained  # not trained again
    assert (tmp_path / "px.png").stat().st_size > 0
    for flags, named in (  # refused in one line, before anything is trained
        (["--figure", str(tmp_path / "x.png"), "--beside", str(latent)], "--beside"),
        (["--dataset_dir", str(tmp_path / "nowhere")], "--dataset_dir"),
    ):
        refused = subprocess.run(designs + flags, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert refused.returncode == 2 and named in refused.stderr.strip().splitlines()[-1], refused.stderr
        assert not (tmp_path / "x.png").exists()


def test_sampler_noise_benchmark_quick_scores_each_setting_and_reads_them_back(tmp_path):
    command = [sys.executable, "benchmarks/benchmark_sampler_noise.py", "--quick", "--work_dir", str(tmp_path)]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    euler, late = "eta=0,num_inference_steps=4", "eta=1,eta_below=0.5,num_inference_steps=4"
    for setting in (euler, late, euler + ",guidance=2"):  # the last guided by a 1-epoch stage 2 trained for it
        assert f"| {setting} | " in result.stdout
    assert (tmp_path / "guide" / "epochs1" / "best_model.pt").is_file()
    assert "Test clouds: linearity mean" in result.stdout and "nm, narrowest axis z share" in result.stdout
    by_statistic = result.stdout.split("C2ST on each statistic alone")[1]
    assert f"| {late} | " in by_statistic and "| samples | point count | NN distance | z |" in by_statistic
    samples = tmp_path / "eta-1_eta_below-0.5_num_inference_steps-4" / "samples" / "pointcloud" / "samples.h5"
    clouds, _ = read_point_clouds(samples)
    info = json.loads((tmp_path / "data102" / "voxels_nifti" / "dataset_info.json").read_text())["geometry"]
    assert len(clouds) == 10 and all(
        (c.min(0) >= np.array(info["box_min_nm"]) - 1e-3).all()
        and (c.max(0) <= np.array(info["box_max_nm"]) + 1e-3).all()
        for c in clouds
    )
    made = samples.stat().st_mtime_ns
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and f"| {late} | " in again.stdout and samples.stat().st_mtime_ns == made
    for flag in ("--model_dir", "--guide"):
        refused = subprocess.run(command + [flag, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
        assert refused.returncode == 2 and flag in refused.stderr.strip().splitlines()[-1]
    bad = [sys.executable, "benchmarks/benchmark_sampler_noise.py", "--work_dir", str(tmp_path / "bad")]
    refused = subprocess.run(bad + ["--settings", "eta=0,guidance=two"], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "guidance=W a number" in refused.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "bad").exists()


def test_folded_unet_folds_depth_into_channels_and_back():
    """The 2D design's network sees each (x, y) column's whole depth as channels: with its 2D UNet replaced by the
    identity it returns its input exactly, and its 2D UNet is given C·Z channels."""
    import torch
    from benchmarks.benchmark_stage2_designs import QUICK_FOLDED, FoldedUNet

    unet = FoldedUNet([3, 8, 8, 4], **{**QUICK_FOLDED, "spatial_dims": 2})
    assert unet.unet.conv_in.conv.in_channels == 12
    x = torch.randn(2, 3, 8, 8, 4)
    assert unet(x, timesteps=torch.tensor([1, 500])).shape == x.shape
    seen = []

    class Identity(torch.nn.Module):
        def forward(self, h, timesteps):
            seen.append(h)
            return h

    unet.unet = Identity()
    assert torch.equal(unet(x, timesteps=torch.tensor([1, 500])), x)
    assert torch.equal(seen[0][1, 1 * 4 + 3], x[1, 1, :, :, 3])  # channel c·Z + z holds depth z of channel c


def test_autoguidance_moves_from_the_guide_towards_the_model_by_its_weight():
    import torch
    from benchmarks.benchmark_sampler_noise import AutoGuided

    model, guide = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.allclose(AutoGuided(model, guide, 1)(x), model(x), atol=1e-6)
        assert torch.allclose(AutoGuided(model, guide, 0)(x), guide(x), atol=1e-6)
        assert torch.allclose(AutoGuided(model, guide, 3)(x), guide(x) + 3 * (model(x) - guide(x)), atol=1e-5)


def test_gaussian_denoiser_reaches_the_wiener_error_of_a_known_gaussian():
    """The layout benchmark's Gaussian reference, on a stationary Gaussian with a known spectrum and two correlated
    channels: its clean-latent error equals the Wiener filter's exact error, and it falls with the noise level."""
    import torch
    from benchmarks.benchmark_stage2_layout import gaussian_denoiser

    shape, generator = (8, 8, 4), torch.Generator().manual_seed(0)
    k = torch.stack(torch.meshgrid(*(torch.fft.fftfreq(n) * n for n in shape), indexing="ij"))
    h = torch.exp(-(k**2).sum(0) / 4) + 0.2  # real and symmetric: real fields with power h² per frequency

    def draw(n):
        white = torch.randn((n, 1, *shape), generator=generator)
        a = torch.fft.ifftn(torch.fft.fftn(white, dim=(2, 3, 4)) * h, dim=(2, 3, 4)).real
        return torch.cat([a, 0.8 * a + 0.3 * torch.randn(a.shape, generator=generator)], 1) + 0.5

    train, test = draw(4000), draw(500)
    denoise = gaussian_denoiser(train)
    p = (h**2).flatten()[:, None, None]  # the exact channel covariance per frequency
    cov = p * torch.tensor([[1.0, 0.8], [0.8, 0.64]]) + torch.tensor([[0.0, 0.0], [0.0, 0.09]])
    errors = []
    for t in (0.2, 0.5, 0.8):
        noisy = (1 - t) * test + t * torch.randn(test.shape, generator=generator)
        empirical = float(((denoise(noisy, t) - test) ** 2).mean())
        m = (1 - t) ** 2 * cov + t**2 * torch.eye(2)
        exact = float(torch.diagonal(cov - (1 - t) ** 2 * cov @ torch.linalg.solve(m, cov), dim1=1, dim2=2).mean())
        assert abs(empirical / exact - 1) < 0.05, (t, empirical, exact)
        errors.append(empirical)
    assert errors[0] < errors[1] < errors[2] < float(test.var(0).mean())


def test_scaling_benchmark_data_only_converts_a_row_into_the_autoencoders_box_and_trains_nothing(tmp_path):
    """``--data_only`` (how the shipped fine stage's 1000 training clouds are made): the row's clouds simulated and
    converted into the shipped autoencoder's box and grid, no stage 2 trained, no report written."""
    command = [sys.executable, "benchmarks/benchmark_stage2_scaling.py", "--work_dir", str(tmp_path)]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    result = subprocess.run(
        command + ["--rows", "12:on", "--data_only"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    info = json.loads((tmp_path / "data12" / "voxels_nifti" / "dataset_info.json").read_text())
    shipped = json.loads((ROOT / "models" / "checkpoints.json").read_text())["model_autoencoder.pt"]["checkpoint"]
    box = shipped["dataset_info"]["geometry"]
    assert info["counts"]["n_train"] == 12 and info["counts"]["n_val"] == 100
    assert np.allclose(info["geometry"]["box_min_nm"], box["box_min_nm"], atol=1e-2)
    assert np.allclose(info["geometry"]["box_max_nm"], box["box_max_nm"], atol=1e-2)
    assert info["geometry"]["shape"] == box["shape"]
    assert not (tmp_path / "n12_aug" / "diffusion").exists() and not (tmp_path / "report.md").exists()


def test_scaling_benchmark_converts_into_the_grid_of_a_training_layout_autoencoder(tmp_path):
    """``--model_dir`` in the training layout (``autoencoder/best_model.pt``) with an autoencoder of another grid:
    the row's clouds are converted into that autoencoder's grid, not the shipped one's."""
    import torch
    from scripts.networks.trained import load_autoencoder_checkpoint

    shipped = load_autoencoder_checkpoint(ROOT / "models" / "model_autoencoder.pt")  # as training writes one
    geometry = shipped["dataset_info"]["geometry"]
    geometry["shape"] = [16, 16, 8]  # coarser than the shipped [64, 64, 16], as a finer one would differ too
    geometry["spacing_nm"] = [
        (hi - lo) / n for lo, hi, n in zip(geometry["box_min_nm"], geometry["box_max_nm"], [16, 16, 8])
    ]
    (tmp_path / "models" / "autoencoder").mkdir(parents=True)
    torch.save(shipped, tmp_path / "models" / "autoencoder" / "best_model.pt")
    command = [sys.executable, "benchmarks/benchmark_stage2_scaling.py", "--work_dir", str(tmp_path / "work")]
    command += ["--model_dir", str(tmp_path / "models"), "--rows", "12:on", "--data_only"]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    info = json.loads((tmp_path / "work" / "data12" / "voxels_nifti" / "dataset_info.json").read_text())
    assert info["geometry"]["shape"] == [16, 16, 8]
    assert np.allclose(info["geometry"]["box_max_nm"], geometry["box_max_nm"], atol=1e-2)
    # a --model_dir without an autoencoder is refused in one line, before the work dir is made
    (tmp_path / "empty").mkdir()
    command[command.index(str(tmp_path / "models"))] = str(tmp_path / "empty")
    command[command.index(str(tmp_path / "work"))] = str(tmp_path / "work2")
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and "--model_dir" in last and "no such checkpoint" in last
    assert not (tmp_path / "work2").exists()
