"""Handlers wired in the configs: checkpoint save and resume, projection pictures in TensorBoard."""

import logging
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from monai.handlers import ValidationHandler
from monai.utils import CommonKeys
from scripts.evaluation.projections import projection_grid
from scripts.networks.build import unwrap
from scripts.networks.checkpoints import load_checkpoint, load_state, rng_state, save_checkpoint, set_rng_state
from scripts.runtime.errors import UserError
from scripts.runtime.output_folders import CHECKPOINT_NAMES
from scripts.runtime.progress import interactive

logger = logging.getLogger(__name__)


def _state(engine):
    """What a checkpoint holds about the trainer besides the objects: epoch, iteration, scalers, RNG states."""
    return {
        "epoch": engine.state.epoch,
        "iteration": engine.state.iteration,
        "scalers": {name: s.state_dict() for name, s in getattr(engine, "scalers", {}).items()},
        "rng": rng_state(),
    }


class LazySummaryWriter:
    """A ``torch.utils.tensorboard.SummaryWriter`` made at its first use: a run that stops before it logs anything
    (a bad volume, a bad setting) leaves no log folder behind."""

    def __init__(self, log_dir):
        self.log_dir, self._writer = log_dir, None

    def __getattr__(self, name):
        from torch.utils.tensorboard import SummaryWriter

        # copy, pickle and introspection probes (MONAI's data-loader workers ask every object for
        # ``set_random_state``) do not make a writer: only SummaryWriter's own methods do
        if name.startswith("_") or not hasattr(SummaryWriter, name):
            raise AttributeError(name)
        if self._writer is None:
            self._writer = SummaryWriter(self.log_dir)
        return getattr(self._writer, name)

    def close(self):
        if self._writer is not None:
            self._writer.close()


class StageCheckpointSaver:
    """Writes ``latest_checkpoint.pt`` after every epoch and ``best_model.pt`` when the evaluator's key metric
    improves, both atomically, as plain dicts (see :mod:`scripts.networks.checkpoints`). Each object's state dict is a
    top-level entry under its name, so ``ckpt_export --key_in_ckpt autoencoder`` (or ``unet``) reads it directly.

    Args:
        save_dir: output folder (created; never emptied).
        stage: 'autoencoder', 'diffusion' or 'refiner', stored so the wrong kind of checkpoint is refused later.
        objects: name → network or optimizer whose ``state_dict`` is saved.
        metadata: plain values saved as they are (network hyper-parameters, dataset geometry, ...).
        evaluator: the validation evaluator; without it no ``best_model.pt`` is written.
        overwrite: the run replaces an earlier run's checkpoints in ``save_dir`` (the configs refuse such a folder
            otherwise): those this run has not rewritten are removed at its first save, so the folder never holds
            checkpoints of two runs.
    """

    def __init__(self, save_dir, stage, objects, metadata=None, evaluator=None, overwrite=False):
        self.save_dir, self.stage, self.objects = Path(save_dir), stage, objects
        self.metadata, self.evaluator = metadata or {}, evaluator
        self.stale = [p for p in map(self.save_dir.joinpath, CHECKPOINT_NAMES) if p.exists()] if overwrite else []
        self.trainer = None

    def attach(self, engine):
        self.trainer = engine
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save_latest)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self.save_best)

    def payload(self):
        ev = self.evaluator.state if self.evaluator is not None else None
        return {
            "stage": self.stage,
            **_state(self.trainer),
            **{name: unwrap(obj).state_dict() for name, obj in self.objects.items()},
            "best_metric": None if ev is None else float(ev.best_metric),
            "best_metric_epoch": None if ev is None else int(ev.best_metric_epoch),
            "key_metric_name": None if ev is None else ev.key_metric_name,
            **self.metadata,
        }

    def save_latest(self, engine):
        path = save_checkpoint(self.save_dir / "latest_checkpoint.pt", self.payload())
        engine.state.last_checkpoint = (str(path), engine.state.epoch)  # what an interrupt reports as intact
        for stale in self.stale:  # the earlier run's best_model.pt, when this run has not written its own yet
            if stale != path and stale.exists():
                stale.unlink()
                logger.info(f"removed {stale} of the earlier run (--overwrite true)")
        self.stale = []
        logger.info(f"epoch {engine.state.epoch}: saved {path}")

    def save_best(self, evaluator):
        if evaluator.state.best_metric_epoch != self.trainer.state.epoch:
            return
        path = save_checkpoint(self.save_dir / "best_model.pt", self.payload())
        self.stale = [p for p in self.stale if p != path]
        logger.info(
            f"epoch {self.trainer.state.epoch}: {evaluator.state.key_metric_name} = "
            f"{evaluator.state.best_metric:.4f} is the best so far, saved {path}"
        )


class ValidationAtIntervalAndEnd(ValidationHandler):
    """MONAI's ``ValidationHandler`` (same arguments), which also validates after the last epoch when that epoch is
    not on the interval, so every run ends validated and leaves a ``best_model.pt`` (a 3-epoch run at
    ``val_interval`` 5 validates once, after epoch 3; a 10-epoch run at 5 after epochs 5 and 10, not twice)."""

    def attach(self, engine):
        super().attach(engine)
        if self.epoch_level:
            engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=self._last_off_interval), self)

    def _last_off_interval(self, engine, epoch):
        return epoch == engine.state.max_epochs and epoch % self.interval != 0


class StageCheckpointLoader:
    """Resumes training from ``resume_from`` (``None``: start fresh) when the trainer starts: weights, optimizers,
    grad scalers, epoch and iteration, best metric and RNG states. Training continues at the next epoch.

    The configs check at start-up that the checkpoint's settings match the run's
    (:func:`scripts.networks.checkpoints.check_resume`).

    Args:
        resume_from: a ``latest_checkpoint.pt`` (or ``best_model.pt``) written by :class:`StageCheckpointSaver`.
        stage: the expected stage of the checkpoint.
        objects: name → network or optimizer to restore (the same names the saver used).
        evaluator: its best metric is restored so ``best_model.pt`` is not overwritten by a worse epoch.
    """

    def __init__(self, resume_from, stage, objects, evaluator=None):
        self.resume_from, self.stage, self.objects, self.evaluator = resume_from, stage, objects, evaluator

    def attach(self, engine):
        if self.resume_from:
            engine.add_event_handler(Events.STARTED, self.resume)

    def resume(self, engine):
        path = self.resume_from
        ckpt = load_checkpoint(path, self.stage, hint="check --resume_from")
        for name, obj in self.objects.items():
            if name not in ckpt:
                raise UserError(f"{path}: holds no {name!r} state")
            load_state(unwrap(obj), ckpt[name], path, name)
        for name, scaler in getattr(engine, "scalers", {}).items():
            if ckpt["scalers"].get(name):
                scaler.load_state_dict(ckpt["scalers"][name])
        engine.state.epoch, engine.state.iteration = ckpt["epoch"], ckpt["iteration"]
        if self.evaluator is not None and ckpt.get("best_metric") is not None:
            self.evaluator.state.best_metric = ckpt["best_metric"]
            self.evaluator.state.best_metric_epoch = ckpt["best_metric_epoch"]
        set_rng_state(ckpt["rng"])
        engine.state.last_checkpoint = (str(path), ckpt["epoch"])
        if ckpt["epoch"] >= engine.state.max_epochs:
            logger.warning(f"{path}: already trained for {ckpt['epoch']} epochs; raise n_epochs to train on")
        logger.info(f"resumed from {path} at epoch {ckpt['epoch']}; continuing with epoch {ckpt['epoch'] + 1}")


class ProjectionImageHandler:
    """Logs maximum-intensity projections of inputs beside outputs to TensorBoard every ``interval`` epochs.

    Attach it to an evaluator run by ``ValidationHandler`` (its last batch is drawn; its epoch is the trainer's).

    Args:
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter``.
        interval: epochs between pictures.
        tag: TensorBoard image tag.
        max_volumes: how many volumes of the batch to show (one row each: input | output).
    """

    def __init__(self, summary_writer, interval=1, tag="val/input_vs_reconstruction", max_volumes=2):
        self.writer, self.interval, self.tag, self.max_volumes = summary_writer, interval, tag, max_volumes

    def attach(self, engine):
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine):
        epoch = engine.state.epoch  # an evaluator run by ValidationHandler counts the trainer's epochs
        if epoch % self.interval:
            return
        output = engine.state.output
        items = (
            output
            if isinstance(output, list)
            else [
                {k: output[k][i] for k in (CommonKeys.IMAGE, CommonKeys.PRED)}
                for i in range(len(output[CommonKeys.PRED]))
            ]
        )
        rows = [[_numpy(it[CommonKeys.IMAGE]), _numpy(it[CommonKeys.PRED])] for it in items[: self.max_volumes]]
        self.writer.add_image(self.tag, projection_grid(rows), global_step=epoch, dataformats="HW")
        self.writer.flush()


def _numpy(x):
    return x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


class EpochProgress:
    """A progress bar over the iterations of each epoch on a terminal, showing the named outputs (e.g. the loss);
    in a file or a pipe, one line per epoch instead: the epoch, the outputs' means and its time."""

    def __init__(self, output_keys=("loss",)):
        self.output_keys = output_keys

    def _outputs(self, out):
        return {k: out[k] for k in self.output_keys if k in out}

    def attach(self, engine):
        if interactive():
            from ignite.handlers import EpochProgress as IgniteProgressBar

            IgniteProgressBar(persist=True).attach(engine, output_transform=self._outputs)
            return
        sums = {}
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: sums.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self._add(sums, e.state.output))
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: self._line(sums, e))

    def _add(self, sums, output):
        for key, value in self._outputs(output).items():
            total, n = sums.get(key, (0.0, 0))
            sums[key] = (total + float(value), n + 1)

    def _line(self, sums, engine):
        means = ", ".join(f"{k} {total / max(n, 1):.4g}" for k, (total, n) in sums.items())
        seconds = engine.state.times.get("EPOCH_COMPLETED") or 0.0
        print(f"epoch {engine.state.epoch}/{engine.state.max_epochs}: {means} ({seconds:.1f} s)", flush=True)


class SampleImageHandler:
    """Every ``interval`` epochs, samples ``num_samples`` grids (rectified-flow Euler steps, or DDIM for the ddpm
    objective) and logs their projections to TensorBoard beside real validation volumes; also logs the scale factor
    once at the start.

    The start noise, and the fresh noise of stochastic RFlow steps, come from private seeded generators, so
    monitoring neither changes the training's random stream nor varies between epochs except through the weights.
    """

    def __init__(
        self,
        summary_writer,
        autoencoder,
        unet,
        scheduler_settings,
        scale_factor,
        latent_shape,
        real_datalist,
        transform,
        interval=10,
        num_samples=2,
        num_inference_steps=50,
        seed=0,
        tag="samples/real_vs_generated",
    ):
        self.writer, self.autoencoder, self.unet = summary_writer, autoencoder, unet
        self.scheduler_settings, self.scale_factor, self.latent_shape = scheduler_settings, scale_factor, latent_shape
        self.real = [transform(d)["image"] for d in real_datalist[:num_samples]]
        self.interval, self.num_samples, self.steps, self.seed, self.tag = (
            interval,
            num_samples,
            num_inference_steps,
            seed,
            tag,
        )

    def attach(self, engine):
        engine.add_event_handler(
            Events.STARTED, lambda e: self.writer.add_scalar("scale_factor", self.scale_factor, e.state.epoch)
        )
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine):
        from scripts.networks.schedulers import make_scheduler, sample_grids, step_noise

        epoch = engine.state.epoch
        if epoch % self.interval:
            return
        scheduler = make_scheduler(self.scheduler_settings, None, self.steps, generator=step_noise(self.seed))
        was_training = self.unet.training
        self.unet.eval()
        grids = sample_grids(
            self.autoencoder,
            unwrap(self.unet),
            scheduler,
            self.scale_factor,
            self.latent_shape,
            self.num_samples,
            engine.state.device,
            torch.Generator().manual_seed(self.seed),
        )
        self.unet.train(was_training)
        rows = [[_numpy(r), _numpy(g)] for r, g in zip(self.real, grids)]
        self.writer.add_image(self.tag, projection_grid(rows), global_step=epoch, dataformats="HW")
        self.writer.flush()


class WeightAverage:
    """An exponential moving average of a network's weights, updated after every iteration.

    ``ema_model`` (same architecture) starts as a copy of ``model``; its weights then follow
    ``ema = d·ema + (1 - d)·weights`` with ``d = min(decay, (1 + n) / (10 + n))`` at iteration ``n``, so the first
    iterations, whose weights are far from trained, fade quickly. Buffers are copied. Put ``ema_model`` among the
    checkpoint objects: it is saved, and restored on resume.

    Args:
        model: the trained network (a DDP wrapper is unwrapped).
        ema_model: the averaged copy, used for validation, monitoring and sampling.
        decay: the largest decay.
    """

    def __init__(self, model, ema_model, decay=0.999):
        self.model, self.ema_model, self.decay = model, ema_model, decay
        self.ema_model.load_state_dict(unwrap(model).state_dict())  # a resumed run then loads its saved average
        self.ema_model.eval().requires_grad_(False)

    def attach(self, engine):
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine):
        n = engine.state.iteration
        d = min(self.decay, (1.0 + n) / (10.0 + n))
        source = unwrap(self.model)
        for ema, weights in zip(self.ema_model.parameters(), source.parameters()):
            ema.lerp_(weights.detach(), 1.0 - d)
        for ema, buffer in zip(self.ema_model.buffers(), source.buffers()):
            ema.copy_(buffer)
