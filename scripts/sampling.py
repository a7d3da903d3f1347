"""Sampling new grids: noise → DDPM/DDIM denoising in latent space → decoded by the autoencoder."""

import torch
from monai.inferers import LatentDiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from scripts.engines import autocast_context
from scripts.errors import UserError

SCHEDULERS = {"DDPM": DDPMScheduler, "DDIM": DDIMScheduler}


def make_scheduler(settings, kind="DDPM", num_inference_steps=None):
    """A scheduler of ``kind`` ('DDPM' or 'DDIM') with the training noise schedule ``settings``
    (``num_train_timesteps``, ``schedule``, ``beta_start``, ``beta_end``)."""
    kind = str(kind).upper()
    if kind not in SCHEDULERS:
        raise UserError(f"scheduler: expected DDPM or DDIM, got {kind!r}")
    extra = {"clip_sample": False} if kind == "DDIM" else {}
    scheduler = SCHEDULERS[kind](**settings, **extra)
    if num_inference_steps is not None:
        steps = int(num_inference_steps)
        if not 0 < steps <= settings["num_train_timesteps"]:
            raise UserError(f"num_inference_steps: must be in 1..{settings['num_train_timesteps']}, got {steps}")
        scheduler.set_timesteps(steps)
    return scheduler


def sample_grids(
    autoencoder, unet, scheduler, scale_factor, latent_shape, n, device, generator=None, amp_dtype=None, verbose=False
):
    """``n`` decoded grids (n, 1, X, Y, Z) on the CPU, from noise drawn with ``generator`` (reproducible)."""
    noise = torch.randn((n, *latent_shape), generator=generator).to(device)
    inferer = LatentDiffusionInferer(scheduler=scheduler, scale_factor=scale_factor)
    with torch.no_grad(), autocast_context(device, amp_dtype):
        grids = inferer.sample(
            input_noise=noise, autoencoder_model=autoencoder, diffusion_model=unet, scheduler=scheduler, verbose=verbose
        )
    return grids.float().cpu()
