"""What stage 2's samples are made of: the same sampling noise under every recipe of a scaling run, and the Gaussian
flow of that noise.

Reads what ``benchmarks/benchmark_stage2_scaling.py`` kept in ``--work_dir`` (each row's ``step*.pt`` and the
samples scored at each milestone, all drawn with sampling seed 0):

1. **Same noise, another recipe.** For each pair of scored checkpoints: the median Chamfer distance (clouds of 2048
   points divided by the box's largest extent, as the set metrics) between sample i of one and sample i of the
   other, beside the reference: sample i of one and sample j ≠ i of the other (two unrelated samples). A ratio far
   below 1 says the two recipes draw the same cloud from the same noise.
2. **The Gaussian flow.** Rectified flow maps noise to a Gaussian with the latents' mean and power spectrum by
   ``z = m + F⁻¹(√P · F(noise))``. For each checkpoint: its 20-step samples and that map, from the same noise, both
   decoded; the correlation of the decoded grids for the same noise beside that for other noise (reference), and
   each one's foreground fraction beside the decoded training latents'. A high same-noise correlation says the
   samples' layout is the Gaussian part of the latent distribution (its second-order statistics), sharpened.
3. **What the UNet knows beyond the Gaussian.** At noise levels ``t`` (``x_t = (1 - t) x_0 + t n``), the error of
   each checkpoint's clean-latent prediction ``x_t + t v`` on the row's validation latents, beside the best
   prediction a Gaussian with the training latents' mean and spectrum allows (the Wiener filter
   ``m + (1 - t) C ((1 - t)² C + t² I)⁻¹ (x_t - (1 - t) m)``, ``C`` the 3 × 3 channel covariance per spatial
   frequency). Both as a fraction of the latents' variance, and their ratio: 1 says the UNet predicts no more than
   the Gaussian at that noise level, where the samples' layout is set.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/benchmark_stage2_layout.py --work_dir ~/runs/scaling
"""

import functools
import itertools
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root: benchmarks.common and scripts

from benchmarks import common  # noqa: E402

# isort: split
import numpy as np  # noqa: E402

N_GAUSS, N_SPECTRUM, N_PAIRS, POINTS, STEPS, N_DENOISED = 30, 200, 30, 2048, 20, 100
NOISE_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)
QUICK = {"n_gauss": 4, "n_spectrum": 8, "n_pairs": 4, "n_denoised": 4}


def scored(work):
    """``{"row stepN": folder}`` of every milestone with samples, in the order the scaling run made them."""
    found = {}
    for folder in sorted(Path(work).glob("n*/step*/samples/pointcloud/samples.h5"), key=lambda p: p.stat().st_mtime):
        step = folder.parents[2]
        found[f"{step.parent.name} {step.name}"] = step
    return found


def same_noise(found, n_pairs, rng, extent):
    """Rows of (pair, same-seed CD, other-seed CD, ratio) over every pair of scored milestones."""
    from scripts.data.pointclouds import read_point_clouds
    from scripts.evaluation.metrics import chamfer_distance, subsample

    clouds = {}
    for name, step in found.items():
        read = read_point_clouds(step / "samples" / "pointcloud" / "samples.h5")[0][:n_pairs]
        clouds[name] = [subsample(c, POINTS, rng) / extent for c in read]
    rows = []
    for a, b in itertools.combinations(clouds, 2):
        n = min(len(clouds[a]), len(clouds[b]))
        same = np.median([chamfer_distance(clouds[a][i], clouds[b][i]) for i in range(n)])
        other = np.median([chamfer_distance(clouds[a][i], clouds[b][(i + 1) % n]) for i in range(n)])
        rows.append((f"{a} / {b}", same * 1e3, other * 1e3, same / other))
    return rows


@functools.lru_cache(maxsize=None)
def encoded_grids(autoencoder_path, folder, n):
    """The autoencoder and its posterior (mu, sigma) of the first ``n`` grids of ``folder``, once per folder."""
    import torch
    from benchmarks.benchmark_stage2_scaling import training_grids
    from scripts.networks.trained import frozen_autoencoder, load_autoencoder_checkpoint

    ae_ckpt = load_autoencoder_checkpoint(autoencoder_path)
    autoencoder = frozen_autoencoder(ae_ckpt, autoencoder_path, "cpu")
    images = training_grids(folder, ae_ckpt["voxel_size"], n)
    with torch.no_grad():
        return (autoencoder, *autoencoder.encode(images))


def _stage2(work, row, ckpt_path):
    """A scaling row's checkpoint, its UNet (on the CPU) and the conversion the row trained on."""
    from scripts.networks.checkpoints import load_checkpoint
    from scripts.networks.trained import trained_unet

    ckpt = load_checkpoint(ckpt_path, "diffusion")
    size = re.match(r"n(\d+)_", row).group(1)
    return ckpt, trained_unet(ckpt, ckpt_path, "cpu"), Path(work) / f"data{size}" / "voxels_nifti"


def _latents(autoencoder_path, folder, n, ckpt, generator=None):
    """The latents ``ckpt`` was trained on, of the first ``n`` grids of ``folder``: drawn from the encoder's posterior
    as its ``latent_draw`` says (with ``generator``; ``None``: torch's global one), times its scale factor."""
    from scripts.training.latents import sample_latents

    _, mu, sigma = encoded_grids(str(autoencoder_path), str(folder), n)
    draw = ckpt.get("latent_draw", "sample")
    return sample_latents({"z_mu": mu, "z_sigma": sigma}, None, "cpu", generator, draw) * ckpt["scale_factor"]


def gaussian_flow(work, row, ckpt_path, autoencoder_path, n, n_spectrum, figure=None):
    """(same-noise correlation, other-noise correlation, foreground % of real, model, Gaussian) for one checkpoint;
    with ``figure``, a PNG of the xy maximum projections: decoded training latents, samples, Gaussian flow."""
    import torch
    from scripts.networks.schedulers import make_scheduler, sample_grids

    ckpt, unet, data = _stage2(work, row, ckpt_path)
    scale, shape = ckpt["scale_factor"], tuple(ckpt["latent_shape"])
    autoencoder = encoded_grids(str(autoencoder_path), str(data / "train"), n_spectrum)[0]
    scheduler = make_scheduler(ckpt["scheduler"], "RFlow", STEPS, eta=0.0)  # the deterministic map it measures
    # the bundle's sampling, from noise drawn with seed 0; the Gaussian flow of the same noise
    samples = sample_grids(autoencoder, unet, scheduler, scale, shape, n, "cpu", torch.Generator().manual_seed(0))
    noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        real = _latents(autoencoder_path, data / "train", n_spectrum, ckpt)
        mean = real.mean((0, 2, 3, 4), keepdim=True)
        power = (torch.fft.fftn(real - mean, dim=(2, 3, 4)).abs() ** 2).mean(0, keepdim=True)
        whitened = torch.fft.fftn(noise, dim=(2, 3, 4)) * torch.sqrt(power / float(np.prod(shape[1:])))
        gauss = mean + torch.fft.ifftn(whitened, dim=(2, 3, 4)).real
        grids = [autoencoder.decode(real[:n] / scale)[:, 0], samples[:, 0], autoencoder.decode(gauss / scale)[:, 0]]

    def corr(a, b):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return float(a @ b / (a.norm() * b.norm()))

    model, gaussian = grids[1], grids[2]
    if figure:
        _figure(grids, figure)
    same = np.median([corr(model[i], gaussian[i]) for i in range(n)])
    other = np.median([corr(model[i], gaussian[(i + 1) % n]) for i in range(n)])
    return (same, other, *(float((g > 0.1).float().mean()) * 100 for g in grids))


def gaussian_denoiser(real):
    """The best clean-latent prediction under a Gaussian with the mean and spectrum of ``real`` (N, C, X, Y, Z): a
    function ``(x_t, t) -> x_0`` (the Wiener filter per spatial frequency, channels jointly)."""
    import torch

    mean = real.mean(0, keepdim=True)
    f = torch.fft.fftn(real - mean, dim=(2, 3, 4), norm="ortho").flatten(2).permute(2, 0, 1)  # (K, N, C)
    cov = f.transpose(1, 2) @ f.conj() / len(real)  # (K, C, C): E[F F^H] per frequency
    eye = torch.eye(real.shape[1], dtype=cov.dtype)

    def denoise(x, t):
        y = torch.fft.fftn(x - (1 - t) * mean, dim=(2, 3, 4), norm="ortho").flatten(2).permute(2, 1, 0)  # (K, C, B)
        gain = (1 - t) * cov @ torch.linalg.inv((1 - t) ** 2 * cov + t**2 * eye)
        out = (gain @ y).permute(2, 1, 0).reshape(x.shape)
        return mean + torch.fft.ifftn(out, dim=(2, 3, 4), norm="ortho").real

    return denoise


def denoising_errors(work, row, ckpt_path, autoencoder_path, n_spectrum, n):
    """Per noise level of :data:`NOISE_LEVELS`: (the UNet's error, the Gaussian's error) of the clean-latent
    prediction on ``n`` of the row's validation latents, each as a fraction of their variance."""
    import torch

    ckpt, unet, data = _stage2(work, row, ckpt_path)
    train, val = (
        _latents(autoencoder_path, data / split, count, ckpt, torch.Generator().manual_seed(0))
        for split, count in (("train", n_spectrum), ("val", n))
    )
    gaussian = gaussian_denoiser(train)
    variance = float(((val - train.mean(0, keepdim=True)) ** 2).mean())
    generator, errors = torch.Generator().manual_seed(1), []
    for t in NOISE_LEVELS:
        x = (1 - t) * val + t * torch.randn(val.shape, generator=generator)
        with torch.no_grad():
            model = x + t * unet(x, timesteps=torch.full((len(x),), t * ckpt["scheduler"]["num_train_timesteps"]))
        errors.append(tuple(float(((p - val) ** 2).mean()) / variance for p in (model, gaussian(x, t))))
    return errors


def _figure(grids, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = ("training clouds (decoded latents)", "stage 2's samples", "Gaussian flow of the same noise")
    n = min(6, len(grids[1]))
    fig, axes = plt.subplots(3, n, figsize=(2 * n, 6.3), squeeze=False)
    for r, (title, batch) in enumerate(zip(titles, grids)):
        for c in range(n):
            axes[r, c].imshow(batch[c].max(-1).values.T, origin="lower", cmap="magma", vmin=0, vmax=1)
            axes[r, c].axis("off")
        axes[r, 0].set_title(title, fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main():
    parser = common.arg_parser(__doc__, "fewer clouds: a smoke check on a --quick scaling run")
    parser.add_argument("--work_dir", required=True, help="the scaling benchmark's --work_dir")
    parser.add_argument("--model_dir", default=str(common.ROOT / "models"), help="the autoencoder the rows used")
    parser.add_argument("--figure", default=None, help="a PNG of one checkpoint's samples beside their Gaussian flow")
    parser.add_argument("--figure_of", default=None, help="that checkpoint, as the table names it (default: the last)")
    args = parser.parse_args()
    sizes = QUICK if args.quick else {"n_gauss": N_GAUSS, "n_spectrum": N_SPECTRUM, "n_pairs": N_PAIRS}
    sizes.setdefault("n_denoised", N_DENOISED)
    found = scored(args.work_dir)
    if not found:
        sys.exit(f"{args.work_dir}: no scored milestones; run benchmarks/benchmark_stage2_scaling.py there first")
    load = common.load_average()
    import monai
    import torch

    lines = common.machine_header("What stage 2's samples are made of", args.quick, load, (torch, monai, np))
    lines += ["", "Same sampling noise, another recipe (Chamfer ×10³, medians):", ""]
    lines += ["| pair | same noise | other noise (reference) | ratio |", "|---|---:|---:|---:|"]
    from benchmarks.benchmark_stage2_scaling import autoencoder_geometry
    from scripts.networks.trained import checkpoint_path

    extent = common.box_extent(autoencoder_geometry(args.model_dir))  # the box the rows were drawn in
    pairs = same_noise(found, sizes["n_pairs"], np.random.default_rng(0), extent)
    lines += [f"| {p} | {s:.2f} | {o:.2f} | {r:.2f} |" for p, s, o, r in pairs]
    if pairs:
        ratios = [r for *_, r in pairs]
        lines += [
            "",
            f"Ratio over the {len(pairs)} pairs: median {np.median(ratios):.2f}, range {min(ratios):.2f}–{max(ratios):.2f}.",
        ]
    lines += ["", f"The Gaussian flow of the same noise ({sizes['n_gauss']} samples, {STEPS} steps):", ""]
    lines += [
        "| checkpoint | corr. same noise | corr. other noise (reference) | foreground % real / samples / Gaussian |",
        "|---|---:|---:|---|",
    ]
    autoencoder = checkpoint_path(args.model_dir, "autoencoder")  # either layout, as the scaling run's
    checkpoints = {name: step.parent / f"{step.name}.pt" for name, step in found.items()}
    checkpoints = {name: ckpt for name, ckpt in checkpoints.items() if ckpt.is_file()}
    for i, (name, ckpt) in enumerate(checkpoints.items()):
        chosen = name == args.figure_of if args.figure_of else i == len(checkpoints) - 1
        figure = args.figure if chosen else None
        same, other, *fg = gaussian_flow(
            args.work_dir, ckpt.parent.name, ckpt, autoencoder, sizes["n_gauss"], sizes["n_spectrum"], figure
        )
        lines.append(f"| {name} | {same:.2f} | {other:.2f} | {' / '.join(f'{f:.1f}' for f in fg)} |")
    lines += [
        "",
        f"Clean-latent error on {sizes['n_denoised']} validation latents, UNet / Gaussian (fractions of their variance):",
        "",
        "| checkpoint | " + " | ".join(f"t = {t}" for t in NOISE_LEVELS) + " |",
        "|---|" + "---:|" * len(NOISE_LEVELS),
    ]
    for name, ckpt in checkpoints.items():
        errors = denoising_errors(
            args.work_dir, ckpt.parent.name, ckpt, autoencoder, sizes["n_spectrum"], sizes["n_denoised"]
        )
        lines.append(f"| {name} | " + " | ".join(f"{m:.3f} / {g:.3f} ({m / g:.2f})" for m, g in errors) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
