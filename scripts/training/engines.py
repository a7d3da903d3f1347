"""The bundle's MONAI engines: trainers that add mixed precision, one grad scaler per optimizer and a check for a
diverged loss to ``monai.engines.Trainer``, each with its own ``_iteration``, and the evaluators of each stage.

Mixed precision follows the device (:mod:`scripts.networks.precision`), with a grad scaler for fp16 on CUDA.
"""

import contextlib
import logging

import numpy as np
import torch
from ignite.engine import Events
from ignite.metrics import Metric
from monai.engines import Evaluator, SupervisedEvaluator, Trainer
from monai.inferers import SlidingWindowInferer
from monai.networks.schedulers import RFlowScheduler
from monai.utils import CommonKeys
from scripts.evaluation.metrics import histogram_w1, nn_distances_nm
from scripts.networks.build import unwrap
from scripts.networks.fine_stage import couple, refine_grid
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


def diffusion_loss(unet, scheduler, latents, autocast, generator=None):
    """MSE of the UNet's prediction at uniformly drawn timesteps: of the velocity ``latents - noise`` for a
    rectified-flow scheduler, of the noise for DDPM."""
    device = latents.device
    cpu_or = "cpu" if generator is not None else device
    noise = torch.randn(latents.shape, generator=generator, device=cpu_or).to(device)
    t = torch.randint(0, scheduler.num_train_timesteps, (latents.shape[0],), generator=generator, device=cpu_or)
    t = t.to(device)
    noisy = scheduler.add_noise(original_samples=latents, noise=noise, timesteps=t)
    target = latents - noise if isinstance(scheduler, RFlowScheduler) else noise
    with autocast:
        prediction = unet(noisy, timesteps=t)
    return torch.nn.functional.mse_loss(prediction.float(), target)


class LatentDiffusionTrainer(MixedPrecisionTrainer):
    """Stage 2: noise prediction on the frozen autoencoder's latents, scaled by ``scale_factor``.

    Batches hold cached ``z_mu``/``z_sigma`` (a latent is drawn from them each step) or ``image`` (encoded on the
    fly by ``autoencoder``).
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
    ):
        self.unet, self.optimizer, self.scheduler = unet, optimizer, scheduler
        self.autoencoder, self.scale_factor = autoencoder, scale_factor
        super().__init__(device, max_epochs, train_data_loader, epoch_length, amp, train_handlers, ("g",), cpu_bf16)

    def _iteration(self, engine, batchdata):
        latents = sample_latents(batchdata, self.autoencoder, self.state.device) * self.scale_factor
        self.unet.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = diffusion_loss(self.unet, self.scheduler, latents, self.autocast())
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
    epochs compare fairly. The key metric is ``val_loss``."""

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
    ):
        from ignite.metrics import Average

        metric = {"val_loss": Average(output_transform=lambda out: out[CommonKeys.LOSS])}
        super().__init__(device, val_data_loader, metric, seed, epoch_length, val_handlers)
        self.unet, self.scheduler, self.autoencoder, self.scale_factor = unet, scheduler, autoencoder, scale_factor
        self.amp_dtype = autocast_dtype(device, amp, cpu_bf16)

    def _iteration(self, engine, batchdata):
        self.unet.eval()
        autocast = autocast_context(self.state.device, self.amp_dtype)
        with torch.no_grad():
            latents = sample_latents(batchdata, self.autoencoder, self.state.device, self.generator)
            loss = diffusion_loss(self.unet, self.scheduler, latents * self.scale_factor, autocast, self.generator)
        return {CommonKeys.LOSS: loss}


class RefinerTrainer(MixedPrecisionTrainer):
    """The fine stage: flow matching of each training point's offset from its anchor voxel (see
    :mod:`scripts.networks.fine_stage`), on the real grid or, with probability ``reconstruction_fraction``, on the autoencoder's
    reconstruction of it, so the model learns to read what the decoder makes.

    Batches hold ``image`` (B, 1, X, Y, Z), optionally ``recon`` (the same shape) and ``points`` (B, n, 3) in
    continuous voxel coordinates of the grid.
    """

    def __init__(
        self,
        device,
        max_epochs,
        train_data_loader,
        refiner,
        optimizer,
        sigma_voxels,
        splat="trilinear",
        reconstruction_fraction=0.5,
        epoch_length=None,
        amp=True,
        train_handlers=None,
        cpu_bf16=True,
    ):
        self.refiner, self.optimizer = refiner, optimizer
        self.sigma_voxels, self.splat, self.reconstruction_fraction = sigma_voxels, splat, reconstruction_fraction
        super().__init__(device, max_epochs, train_data_loader, epoch_length, amp, train_handlers, ("g",), cpu_bf16)

    def _iteration(self, engine, batchdata):
        grids = self.images(batchdata)
        if "recon" in batchdata and self.reconstruction_fraction > 0:
            use = (torch.rand(len(grids)) < self.reconstruction_fraction).to(grids.device)
            grids = torch.where(
                use[:, None, None, None, None], batch_images(batchdata, grids.device, key="recon"), grids
            )
        anchors, offsets, index = couple_batch(batchdata["points"], grids.shape[2:], self.sigma_voxels, self.splat)
        self.refiner.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = unwrap(self.refiner).loss(
                grids, index.to(grids.device), anchors.to(grids.device), offsets.to(grids.device)
            )
        self.step(loss.float(), self.optimizer, "g", "refiner loss")
        return {CommonKeys.LOSS: loss.detach().item()}


def couple_batch(points, shape, sigma_voxels, splat):
    """:func:`scripts.networks.fine_stage.couple` for a batch of point sets (B, n, 3): anchors, offsets and volume indices."""
    anchors, offsets, index = [], [], []
    for b, pts in enumerate(points):
        a, o, _ = couple(pts, tuple(shape), sigma_voxels, splat)
        anchors.append(a)
        offsets.append(o)
        index.append(torch.full((len(a),), b, dtype=torch.long))
    return torch.cat(anchors), torch.cat(offsets), torch.cat(index)


class HistogramW1(Metric):
    """W1 (in the values' unit) between two streams of values, ``(generated, real)`` per update, pooled into
    histograms of ``bins`` bins up to ``max_value`` (larger values fall in the last bin). Histograms add across
    ranks, so the metric is the same under DDP as in one process; the bins make it exact to half a bin."""

    def __init__(self, max_value=500.0, bins=2000, output_transform=lambda x: x, device="cpu"):
        self.edges = np.linspace(0.0, max_value, bins + 1)
        super().__init__(output_transform=output_transform, device=device)

    def reset(self):
        self.counts = torch.zeros((2, len(self.edges) - 1), dtype=torch.float64)

    def update(self, output):
        for row, values in enumerate(output):
            values = np.clip(np.asarray(values, np.float64), 0, self.edges[-1] - 1e-9)
            self.counts[row] += torch.from_numpy(np.histogram(values, self.edges)[0].astype(np.float64))

    def compute(self):
        import ignite.distributed as idist

        counts = idist.all_reduce(self.counts.clone()) if idist.get_world_size() > 1 else self.counts
        return histogram_w1(counts[0].numpy(), counts[1].numpy(), self.edges[1] - self.edges[0])


class RefinerEvaluator(SeededEvaluator):
    """Validation of the fine stage on real grids: each held-out grid is turned into as many points as its cloud
    holds, and the key metric ``val_nn_w1`` is the 1D Wasserstein distance (nm) between the generated and the real
    clouds' nearest-neighbour distances (lower is better)."""

    def __init__(
        self,
        device,
        val_data_loader,
        refiner,
        geometry,
        threshold=0.0,
        flow_steps=12,
        seed=0,
        epoch_length=None,
        val_handlers=None,
    ):
        metric = {"val_nn_w1": HistogramW1(output_transform=lambda out: (out["generated"], out["real"]))}
        super().__init__(device, val_data_loader, metric, seed, epoch_length, val_handlers)
        self.refiner, self.geometry, self.threshold, self.flow_steps = refiner, geometry, threshold, flow_steps

    def _iteration(self, engine, batchdata):
        unwrap(self.refiner).eval()
        grids, points = batchdata["image"], batchdata["points"]
        generated, real = [], []
        for grid, pts in zip(grids, points):
            geometry = self.geometry.with_shape(grid.shape[-3:])
            cloud = geometry.to_nm(pts.numpy())
            new = refine_grid(
                unwrap(self.refiner), grid[0], geometry, len(cloud), self.threshold, self.flow_steps, self.generator
            )
            generated.append(nn_distances_nm(new))
            real.append(nn_distances_nm(cloud))
        return {"generated": np.concatenate(generated), "real": np.concatenate(real)}
