"""Sampling new grids: noise → denoising in latent space (rectified flow, or DDPM/DDIM) → decoded by the autoencoder.

Two training objectives, recorded in the stage-2 checkpoint's ``scheduler`` settings as ``objective``:

- ``rflow`` (the default, as MONAI's MAISI bundle): the UNet predicts the velocity ``latent - noise`` along the
  straight path between them; sampling integrates it in Euler steps (``RFlowScheduler``), by default drawing fresh
  noise in the late ones (:class:`StochasticRFlowScheduler`);
- ``ddpm`` (MONAI's 3D LDM tutorial, and checkpoints without ``objective``): the UNet predicts the noise; sampling
  with DDPM (all steps) or DDIM (few).
"""

import torch
from monai.inferers import LatentDiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from scripts.networks.precision import autocast_context
from scripts.runtime.errors import UserError
from scripts.runtime.settings import SAMPLERS

DDPM_SETTINGS = ("num_train_timesteps", "schedule", "beta_start", "beta_end")
RFLOW_ETA = {"eta": 1.0, "eta_below": 0.5}  # the RFlow sampler's fresh noise by default (StochasticRFlowScheduler)


def objective(settings):
    return settings.get("objective", "ddpm")


class StochasticRFlowScheduler(RFlowScheduler):
    """Rectified-flow sampling that draws part of the noise afresh in its late steps.

    The UNet's velocity ``v`` at ``x_t = (1 - t) x_0 + t n`` gives the clean latent ``x_0 = x_t + t v`` and the
    noise ``n = x_t - (1 - t) v``. Euler's step (``RFlowScheduler``) moves to ``(1 - t') x_0 + t' n``. In the steps
    from a noise level ``t <= eta_below`` this one moves to ``(1 - t') x_0 + t' (sqrt(1 - eta²) n + eta z)``, ``z``
    fresh Gaussian noise from ``generator`` (a CPU ``torch.Generator``; ``None``: torch's global one): ``eta`` 0 is
    Euler's step, 1 re-noises the predicted latent wholly. The early steps stay deterministic, so the sample's
    coarse layout (how much structure, where in z) follows the flow, and the late ones stop carrying the first
    noise's fine layout to the end, where an imperfect model's errors would otherwise persist.
    """

    def __init__(self, num_train_timesteps, eta, eta_below=1.0, generator=None, **kwargs):
        super().__init__(num_train_timesteps, **kwargs)
        self.eta, self.eta_below, self.generator = float(eta), float(eta_below), generator

    def step(self, model_output, timestep, sample, next_timestep=None):
        t = float(timestep) / self.num_train_timesteps
        if next_timestep is None:
            t_next = max(0.0, t - 1.0 / self.num_inference_steps)
        else:
            t_next = float(next_timestep) / self.num_train_timesteps
        original = sample + model_output * t
        noise = sample - model_output * (1 - t)
        if t_next > 0 and t <= self.eta_below:
            fresh = torch.randn(sample.shape, generator=self.generator).to(sample)
            noise = (1 - self.eta**2) ** 0.5 * noise + self.eta * fresh
        return (1 - t_next) * original + t_next * noise, original


def training_scheduler(settings):
    """Stage 2's training scheduler for ``settings``: MONAI's ``RFlowScheduler`` for the rflow objective, its
    ``DDPMScheduler`` for ddpm (both add noise as sampling expects it)."""
    return make_scheduler(settings, "RFlow" if objective(settings) == "rflow" else "DDPM")


def step_noise(seed):
    """The generator of a stochastic RFlow sampler's fresh noise for sampling seed ``seed``: a stream apart from the
    start noise's (seeded ``seed``), so the sampler and the training monitor draw the same noise for one seed."""
    return torch.Generator().manual_seed(seed + 1)


def make_scheduler(
    settings, kind=None, num_inference_steps=None, eta=None, eta_below=None, generator=None, defaults=None
):
    """A scheduler of ``kind`` ('RFlow' for the rflow objective; 'DDPM' or 'DDIM' for ddpm; ``None``: the first of
    these) with the training settings ``settings`` (``objective``, ``num_train_timesteps``, and for ddpm
    ``schedule``, ``beta_start``, ``beta_end``); with ``num_inference_steps`` its timesteps are set for sampling
    (without, it is a training scheduler: RFlow's is MONAI's own).
    ``eta``, ``eta_below``: RFlow's fresh noise per step, and the noise level below which it is drawn
    (:class:`StochasticRFlowScheduler`, its noise from ``generator``; ``eta`` 0: Euler's deterministic steps;
    ``None``: the weights' own ``defaults``, a stage-2 checkpoint's ``sampling``, then :data:`RFLOW_ETA`); the other
    samplers take neither (and ignore ``defaults``)."""
    allowed = SAMPLERS[objective(settings)]
    kind = allowed[0] if kind is None else next((k for k in allowed if k.upper() == str(kind).upper()), None)
    if kind is None:
        raise UserError(
            f"scheduler: the model was trained with the {objective(settings)} objective, which samples with "
            f"{' or '.join(allowed)}"
        )
    for name, value in (("eta", eta), ("eta_below", eta_below)):
        if value is not None and kind != "RFlow":
            raise UserError(
                f"{name}: only RFlow sampling draws fresh noise per step; {kind} takes none (set it to null)"
            )
    if kind == "RFlow":
        if num_inference_steps is None:  # for training: no sampling noise
            eta = 0.0
        default = {**RFLOW_ETA, **(defaults or {})}
        eta = default["eta"] if eta is None else float(eta)
        eta_below = default["eta_below"] if eta_below is None else float(eta_below)
        options = dict(use_discrete_timesteps=True, sample_method="uniform")
        num_train_timesteps = settings["num_train_timesteps"]
        if eta == 0:
            scheduler = RFlowScheduler(num_train_timesteps, **options)
        else:
            scheduler = StochasticRFlowScheduler(num_train_timesteps, eta, eta_below, generator, **options)
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
