"""Sampling new grids: noise → denoising in latent space (rectified flow, or DDPM/DDIM) → decoded by the autoencoder.

Two training objectives, recorded in the stage-2 checkpoint's ``scheduler`` settings as ``objective``:

- ``rflow`` (the default, as MONAI's MAISI bundle): the UNet predicts the velocity ``latent - noise`` along the
  straight path between them; sampling integrates it in a few Euler steps (``RFlowScheduler``);
- ``ddpm`` (MONAI's 3D LDM tutorial, and checkpoints without ``objective``): the UNet predicts the noise; sampling
  with DDPM (all steps) or DDIM (few).
"""

import torch
from monai.inferers import LatentDiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from scripts.networks.precision import autocast_context
from scripts.runtime.errors import UserError

SAMPLERS = {"rflow": ("RFlow",), "ddpm": ("DDIM", "DDPM")}  # the first is the default
DDPM_SETTINGS = ("num_train_timesteps", "schedule", "beta_start", "beta_end")


def objective(settings):
    return settings.get("objective", "ddpm")


def make_scheduler(settings, kind=None, num_inference_steps=None):
    """A scheduler of ``kind`` ('RFlow' for the rflow objective; 'DDPM' or 'DDIM' for ddpm; ``None``: the first of
    these) with the training settings ``settings`` (``objective``, ``num_train_timesteps``, and for ddpm
    ``schedule``, ``beta_start``, ``beta_end``); with ``num_inference_steps`` its timesteps are set for sampling."""
    allowed = SAMPLERS[objective(settings)]
    kind = allowed[0] if kind is None else next((k for k in allowed if k.upper() == str(kind).upper()), None)
    if kind is None:
        raise UserError(
            f"scheduler: the model was trained with the {objective(settings)} objective, which samples with "
            f"{' or '.join(allowed)}"
        )
    if kind == "RFlow":
        scheduler = RFlowScheduler(
            settings["num_train_timesteps"], use_discrete_timesteps=True, sample_method="uniform"
        )
    else:
        extra = {"clip_sample": False} if kind == "DDIM" else {}
        scheduler = (DDIMScheduler if kind == "DDIM" else DDPMScheduler)(
            **{k: settings[k] for k in DDPM_SETTINGS}, **extra
        )
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
