"""The bundle's MONAI engines: trainers that add mixed precision, one grad scaler per optimizer and a check for a
diverged loss to ``monai.engines.Trainer``, each with its own ``_iteration``, and the evaluators of each stage.

Mixed precision follows the device (:mod:`scripts.networks.precision`), with a grad scaler for fp16 on CUDA.
"""

import contextlib
import logging

import torch
from ignite.engine import Events
from monai.engines import Evaluator, SupervisedEvaluator, Trainer
from monai.inferers import SlidingWindowInferer
from monai.networks.schedulers import RFlowScheduler
from monai.utils import CommonKeys
from scripts.networks.build import unwrap
from scripts.networks.precision import autocast_context, autocast_dtype
from scripts.runtime.errors import UserError, interrupted
from scripts.training.latents import sample_latents
from scripts.training.losses import kl_loss

logger = logging.getLogger(__name__)


def _reraise(engine, e):
    """Stop at the first exception; an interrupt of a trainer says where it stopped and which checkpoint is intact
    (one of an evaluator passes through as it is: the trainer that runs the validation says that)."""
    if isinstance(e, KeyboardInterrupt) and not isinstance(engine, Evaluator):
        saved = getattr(engine.state, "last_checkpoint", None)
        where = f"at epoch {engine.state.epoch}, iteration {engine.state.iteration}"
        kept = (
            f"{saved[0]} (epoch {saved[1]}) is intact; resume with --resume_from {saved[0]}"
            if saved
            else "no checkpoint of this run was written yet"
        )
        raise interrupted(e, f"{where}: {kept}") from None
    raise e


def batch_images(batchdata, device=None, non_blocking=False, key=CommonKeys.IMAGE):
    """The batch's images (or another key's volumes) as a plain tensor (not a MetaTensor) on ``device``."""
    images = batchdata[key]
    images = images.as_tensor() if hasattr(images, "as_tensor") else images
    return images.to(device, non_blocking=non_blocking)


def image_as_target(batchdata, device=None, non_blocking=False, **kwargs):
    """``prepare_batch`` for autoencoders: the image is both the input and the target."""
    images = batch_images(batchdata, device, non_blocking)
    return images, images


def reconstruct(images, network):
    """Inferer of the stage-1 evaluator: the deterministic reconstruction (decode of the encoder mean)."""
    return unwrap(network).reconstruct(images)


def reconstruction_inferer(patch_shape=None, sw_batch_size=4, sw_overlap=0.25):
    """The stage-1 evaluator's inferer: :func:`reconstruct` for an autoencoder trained on whole grids, else
    :class:`SlidingWindowReconstruction` with windows of the training patch ``patch_shape``."""
    if patch_shape is None:
        return reconstruct
    return SlidingWindowReconstruction(patch_shape, sw_batch_size, sw_overlap)


class SlidingWindowReconstruction(SlidingWindowInferer):
    """Inferer of the stage-1 evaluator for an autoencoder trained on patches: the deterministic reconstruction of
    whole grids, window by window.

    Args:
        roi_size: the window (X, Y, Z) in voxels, the training patch.
        sw_batch_size: windows run at once.
        overlap: the share of a window its neighbours overlap on each axis; overlaps are blended with Gaussian weights.
    """

    def __init__(self, roi_size, sw_batch_size=4, overlap=0.25):
        super().__init__(roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian")

    def __call__(self, inputs, network, *args, **kwargs):
        return super().__call__(inputs, unwrap(network).reconstruct)


class ReconstructionEvaluator(SupervisedEvaluator):
    """Stage 1's evaluator: MONAI's ``SupervisedEvaluator`` (same arguments) that, like the trainers, stops at the
    first exception before its handlers see it, so an interrupt during validation is not logged with a traceback."""

    def __init__(self, *args, val_handlers=None, **kwargs):
        super().__init__(*args, val_handlers=None, **kwargs)
        self.add_event_handler(Events.EXCEPTION_RAISED, _reraise)
        if val_handlers:
            self._register_handlers(val_handlers)


LOWER_IS_BETTER = ("val_loss", "val_l1", "val_nn_w1")  # the other key metrics (Dice, IoU, PSNR): higher


def better_than(key_metric):
    """The best-model comparison for ``key_metric`` (``metric_cmp_fn(current, best)`` of MONAI's evaluators)."""
    if key_metric in LOWER_IS_BETTER:
        return lambda current, best: current < best
    return lambda current, best: current > best


class TrainingDiverged(UserError):
    """A loss became NaN or Inf; training stops before the bad weights are saved."""


class MixedPrecisionTrainer(Trainer):
    """A ``monai.engines.Trainer`` with device-aware autocast and one grad scaler per optimizer.

    Args:
        device: where to train.
        max_epochs: epochs in total (a resumed run continues up to it).
        train_data_loader: batches of ``{"image": (B, 1, X, Y, Z)}``.
        epoch_length: iterations per epoch; ``None`` is the loader's length (``fast_dev_run`` sets it smaller).
        amp: mixed precision where the device supports it.
        train_handlers: handlers attached to the trainer (checkpoints, logging, validation).
        scaler_names: one grad scaler per optimizer, saved and restored with the checkpoint.
        cpu_bf16: autocast to bfloat16 on a CPU that has it. Stage 1 and the fine stage pass ``True`` (their
            default, measured faster on such CPUs); stage 2 keeps fp32 on CPU (``configs/train_diffusion.json``).
    """

    def __init__(
        self,
        device,
        max_epochs,
        train_data_loader,
        epoch_length=None,
        amp=True,
        train_handlers=None,
        scaler_names=("g",),
        cpu_bf16=False,
    ):
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            handlers=None,
            amp=False,
            decollate=False,
        )
        self.amp_dtype = autocast_dtype(device, amp, cpu_bf16)
        use_scaler = self.amp_dtype == torch.float16
        self.scalers = {name: torch.amp.GradScaler("cuda", enabled=use_scaler) for name in scaler_names}
        logger.info(f"mixed precision: {self.amp_dtype or 'off'} on {torch.device(device).type}")
        # registered before any handler: a user error ends the run at once, without handlers logging a traceback
        self.add_event_handler(Events.EXCEPTION_RAISED, _reraise)
        if train_handlers:
            self._register_handlers(train_handlers)

    def autocast(self):
        return autocast_context(self.state.device, self.amp_dtype)

    def step(self, loss, optimizer, scaler_name, name):
        """Backpropagate ``loss`` and step ``optimizer``; a NaN/Inf loss stops training with a message."""
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"training: {name} is {loss.item()} at epoch {self.state.epoch}, iteration {self.state.iteration}; "
                "stopped before saving (lower the learning rate or the loss weights)"
            )
        scaler = self.scalers[scaler_name]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def images(self, batchdata):
        return batch_images(batchdata, self.state.device, self.non_blocking)


class VaeGanTrainer(MixedPrecisionTrainer):
    """Stage 1: one generator (AutoencoderKL) step, then one discriminator step, per iteration.

    Generator loss = reconstruction + ``kl_weight``·KL (+ ``perceptual_weight``·perceptual) and, after
    ``warm_up_epochs`` epochs, + ``adv_weight``·least-squares adversarial. The discriminator trains only while the
    adversarial term is on.
    """

    def __init__(
        self,
        device,
        max_epochs,
        train_data_loader,
        autoencoder,
        discriminator,
        g_optimizer,
        d_optimizer,
        recon_loss,
        adv_loss,
        kl_weight=1e-6,
        adv_weight=0.01,
        warm_up_epochs=5,
        perceptual_loss=None,
        perceptual_weight=0.0,
        epoch_length=None,
        amp=True,
        train_handlers=None,
        cpu_bf16=True,
    ):
        self.autoencoder, self.discriminator = autoencoder, discriminator
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        self.recon_loss, self.adv_loss, self.perceptual_loss = recon_loss, adv_loss, perceptual_loss
        self.kl_weight, self.adv_weight, self.perceptual_weight = kl_weight, adv_weight, perceptual_weight
        self.warm_up_epochs = warm_up_epochs
        super().__init__(
            device, max_epochs, train_data_loader, epoch_length, amp, train_handlers, ("g", "d"), cpu_bf16=cpu_bf16
        )

    def discriminator_autocast(self):
        """fp16 autocast for the discriminator on CUDA; fp32 on CPU, where its bf16 kernels were not reproducible
        (two identically seeded runs ended with different weights) and it is a small share of the step."""
        return self.autocast() if self.amp_dtype == torch.float16 else contextlib.nullcontext()

    def adversarial_on(self):
        return self.adv_weight > 0 and self.state.epoch > self.warm_up_epochs

    def _iteration(self, engine, batchdata):
        images = self.images(batchdata)
        adversarial = self.adversarial_on()
        self.autoencoder.train()
        self.g_optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            recon, z_mu, z_sigma = self.autoencoder(images)
        recon = recon.float()
        out = {"recon_loss": self.recon_loss(recon, images), "kl_loss": kl_loss(z_mu.float(), z_sigma.float())}
        g_loss = out["recon_loss"] + self.kl_weight * out["kl_loss"]
        if self.perceptual_loss is not None and self.perceptual_weight > 0:
            out["perceptual_loss"] = self.perceptual_loss(recon, images)
            g_loss = g_loss + self.perceptual_weight * out["perceptual_loss"]
        out["gen_adv_loss"] = out["disc_loss"] = g_loss.new_zeros(())
        if adversarial:
            with self.discriminator_autocast():
                logits = self.discriminator(recon.contiguous())[-1]
            out["gen_adv_loss"] = self.adv_loss(logits.float(), target_is_real=True, for_discriminator=False)
            g_loss = g_loss + self.adv_weight * out["gen_adv_loss"]
        self.step(g_loss, self.g_optimizer, "g", "generator loss")
        if adversarial:
            self.discriminator.train()
            self.d_optimizer.zero_grad(set_to_none=True)
            with self.discriminator_autocast():
                fake = self.discriminator(recon.detach().contiguous())[-1].float()
                real = self.discriminator(images.contiguous())[-1].float()
            out["disc_loss"] = 0.5 * (
                self.adv_loss(fake, target_is_real=False, for_discriminator=True)
                + self.adv_loss(real, target_is_real=True, for_discriminator=True)
            )
            self.step(self.adv_weight * out["disc_loss"], self.d_optimizer, "d", "discriminator loss")
        out = {k: v.detach().item() for k, v in out.items()}
        out[CommonKeys.LOSS] = g_loss.detach().item()
        out[CommonKeys.IMAGE], out[CommonKeys.PRED] = images, recon.detach()
        return out


HIGH_NOISE_SHIFT = 3.0  # Stable Diffusion 3's timestep shift for its larger images


def draw_timesteps(n, num_train_timesteps, sampling="uniform", generator=None, device="cpu"):
    """``n`` training timesteps in ``[0, num_train_timesteps)``: uniform; ``logit-normal`` (the sigmoid of a
    standard normal, Stable Diffusion 3's choice for rectified flow: more steps at middle noise levels, where the
    velocity is hardest to predict, fewer at the two ends); or ``high-noise`` (uniform draws ``u`` shifted to
    ``s u / (1 + (s - 1) u)``, ``s`` = :data:`HIGH_NOISE_SHIFT`: half the steps above noise level 0.75, where a
    sample's layout is set)."""
    if sampling == "logit-normal":
        u = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    elif sampling == "high-noise":
        u = torch.rand(n, generator=generator, device=device)
        u = HIGH_NOISE_SHIFT * u / (1 + (HIGH_NOISE_SHIFT - 1) * u)
    else:
        return torch.randint(0, num_train_timesteps, (n,), generator=generator, device=device)
    return (u * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)


def diffusion_loss(unet, scheduler, latents, autocast, generator=None, timestep_sampling="uniform"):
    """MSE of the UNet's prediction at timesteps drawn by :func:`draw_timesteps`: of the velocity
    ``latents - noise`` for a rectified-flow scheduler, of the noise for DDPM."""
    device = latents.device
    cpu_or = "cpu" if generator is not None else device
    noise = torch.randn(latents.shape, generator=generator, device=cpu_or).to(device)
    t = draw_timesteps(latents.shape[0], scheduler.num_train_timesteps, timestep_sampling, generator, cpu_or)
    t = t.to(device)
    noisy = scheduler.add_noise(original_samples=latents, noise=noise, timesteps=t)
    target = latents - noise if isinstance(scheduler, RFlowScheduler) else noise
    with autocast:
        prediction = unet(noisy, timesteps=t)
    return torch.nn.functional.mse_loss(prediction.float(), target)


class LatentDiffusionTrainer(MixedPrecisionTrainer):
    """Stage 2: noise prediction on the frozen autoencoder's latents, scaled by ``scale_factor``.

    Batches hold cached ``z_mu``/``z_sigma`` or ``image`` (encoded on the fly by ``autoencoder``); ``latent_draw``
    'sample' draws each step's latents from the encoder's posterior, 'mean' trains on its mean.
    """

    def __init__(
        self,
        device,
        max_epochs,
        train_data_loader,
        unet,
        optimizer,
        scheduler,
        autoencoder,
        scale_factor,
        epoch_length=None,
        amp=True,
        train_handlers=None,
        cpu_bf16=False,
        timestep_sampling="uniform",
        latent_draw="sample",
    ):
        self.unet, self.optimizer, self.scheduler = unet, optimizer, scheduler
        self.timestep_sampling, self.latent_draw = timestep_sampling, latent_draw
        self.autoencoder, self.scale_factor = autoencoder, scale_factor
        super().__init__(device, max_epochs, train_data_loader, epoch_length, amp, train_handlers, ("g",), cpu_bf16)

    def _iteration(self, engine, batchdata):
        latents = sample_latents(batchdata, self.autoencoder, self.state.device, draw=self.latent_draw)
        latents = latents * self.scale_factor
        self.unet.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = diffusion_loss(
            self.unet, self.scheduler, latents, self.autocast(), timestep_sampling=self.timestep_sampling
        )
        self.step(loss, self.optimizer, "g", "diffusion loss")
        return {CommonKeys.LOSS: loss.detach().item()}


class SeededEvaluator(Evaluator):
    """An evaluator whose random draws repeat at every validation (a generator reseeded with ``seed`` at each run),
    so epochs compare fairly; ``key_metric`` is ``{name: metric}``, compared as :func:`better_than` says."""

    def __init__(self, device, val_data_loader, key_metric, seed=0, epoch_length=None, val_handlers=None):
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            epoch_length=epoch_length,
            decollate=False,
            key_val_metric=key_metric,
            metric_cmp_fn=better_than(next(iter(key_metric))),
            val_handlers=None,
        )
        self.seed, self.generator = seed, torch.Generator()
        self.add_event_handler(Events.EXCEPTION_RAISED, _reraise)
        if val_handlers:
            self._register_handlers(val_handlers)

    def run(self, global_epoch=1):
        self.generator.manual_seed(self.seed)
        super().run(global_epoch)


class LatentDiffusionEvaluator(SeededEvaluator):
    """Validation loss of stage 2 with the same noise and timesteps at every validation (a seeded generator), so
    epochs compare fairly, on latents drawn as in training (``latent_draw``). The key metric is ``val_loss``."""

    def __init__(
        self,
        device,
        val_data_loader,
        unet,
        scheduler,
        autoencoder,
        scale_factor,
        epoch_length=None,
        seed=0,
        val_handlers=None,
        amp=True,
        cpu_bf16=False,
        latent_draw="sample",
    ):
        from ignite.metrics import Average

        metric = {"val_loss": Average(output_transform=lambda out: out[CommonKeys.LOSS])}
        super().__init__(device, val_data_loader, metric, seed, epoch_length, val_handlers)
        self.unet, self.scheduler, self.autoencoder, self.scale_factor = unet, scheduler, autoencoder, scale_factor
        self.amp_dtype = autocast_dtype(device, amp, cpu_bf16)
        self.latent_draw = latent_draw

    def _iteration(self, engine, batchdata):
        self.unet.eval()
        autocast = autocast_context(self.state.device, self.amp_dtype)
        with torch.no_grad():
            latents = sample_latents(batchdata, self.autoencoder, self.state.device, self.generator, self.latent_draw)
            loss = diffusion_loss(self.unet, self.scheduler, latents * self.scale_factor, autocast, self.generator)
        return {CommonKeys.LOSS: loss}
