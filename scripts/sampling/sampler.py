"""Sampling new point clouds: the two checkpoints → grids (NIfTI, with the training box in the affine) → points
(CSV in nm, inside the training box) → a PNG preview. Used by ``configs/inference.json``."""

import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from monai.networks.schedulers import RFlowScheduler
from scripts.data.geometry import GridGeometry
from scripts.data.nifti import save_nifti
from scripts.data.pointclouds import CSV_POINT_BYTES, H5_POINT_BYTES, PointCloudsH5Writer, write_points_csv
from scripts.data.voxelize import EXPORT_THRESHOLD, as_training_grid, grid_to_points
from scripts.evaluation.projections import projections
from scripts.evaluation.rendering import render_points
from scripts.networks.build import downsampling
from scripts.networks.fine_stage import (
    POINT_BYTES,
    check_point_memory,
    check_spacing,
    refine_grid,
    refine_slab,
    sampling_background,
    sampling_settings,
)
from scripts.networks.precision import autocast_dtype
from scripts.networks.schedulers import StochasticRFlowScheduler, make_scheduler, sample_grids, step_noise
from scripts.networks.trained import REFINER_HINT
from scripts.runtime.atomic_write import atomic_path
from scripts.runtime.errors import UserError, interrupted
from scripts.runtime.output_folders import StagedOutput
from scripts.runtime.progress import interactive, progress
from scripts.runtime.resources import check_disk, check_memory, free_disk_bytes, round_down
from scripts.runtime.settings import BY_MASS, ONE_PER_VOXEL, OUTPUT_FORMATS, check_values, grouped
from scripts.sampling.large_fields import decode_tiled, decoding_window, denoise_tiled, field_shapes, sampling_memory

logger = logging.getLogger(__name__)
# the sampler's own files (an earlier run without a manifest is recognised by them)
MAX_PREVIEW_ROWS = 8
PREVIEW_BYTES = 2**23  # on disk, at most: MAX_PREVIEW_ROWS rows of two pictures in a PNG
SAMPLE_FILES = ("nifti/sample_*.nii.gz", "pointcloud/sample_*.csv", "pointcloud/samples.h5", "preview.png")


GROUPS = {  # the Sampler's settings by group, with their defaults
    "denoising": {"scheduler": None, "num_inference_steps": 50, "eta": None, "eta_below": None},
    "export": {
        "method": "probabilistic",
        "threshold": None,
        "num_points": None,
        "output_formats": ("nifti", "csv"),
        "preview": True,
        "pixel_nm": 15.0,
    },
    "fine_stage": {"refiner": None, "checkpoint": None, "flow_steps": None},
    "field": {"size_nm": None, "tile_overlap": 0.5, "sw_batch_size": 8},
}


class Sampler:
    """Writes ``num_samples`` generated grids and point clouds under ``output_dir``.

    Decoded grids are first put on the training grids' scale (:func:`scripts.data.voxelize.as_training_grid`: a
    maximum of 1, and with the fine stage the background level it recorded), so their points are counted and
    placed as the training clouds' were.

    Files: ``nifti/sample_0000.nii.gz`` (training box in the affine), ``pointcloud/sample_0000.csv`` (x, y, z in
    nm under ThunderSTORM headers), optionally ``pointcloud/samples.h5``, and ``preview.png``. Each sample is
    written as soon as it is made, so memory holds one batch of grids and one cloud whatever ``num_samples``; the
    memory of a batch and a cloud and the disk space of all samples are estimated first, and refused when they
    cannot fit.

    Args:
        autoencoder, unet: the trained networks (frozen).
        diffusion_checkpoint: the stage-2 checkpoint (scale factor, noise schedule, latent shape, data geometry).
        output_dir: output folder (created; see ``overwrite``).
        num_samples, batch_size: how many grids, and how many are denoised at once.
        seed: the same seed writes the same files.
        overwrite: replace the samples of an earlier run in ``output_dir`` (only the bundle's own files, all of
            them: the folder never mixes two runs); otherwise such a folder is refused.
        denoising: ``scheduler``: 'RFlow' (rectified-flow checkpoints), 'DDPM' or 'DDIM' (ddpm ones), ``None``:
            RFlow or DDIM, as the checkpoint was trained; ``num_inference_steps``: its steps (``None``: all training
            timesteps); ``eta``, ``eta_below``: RFlow's fresh noise per step and the noise level below which it is
            drawn (:class:`scripts.networks.schedulers.StochasticRFlowScheduler`; ``None``: the checkpoint's own
            ``sampling`` defaults where publishing recorded them, else those of
            :data:`scripts.networks.schedulers.RFLOW_ETA`; ``eta`` 0: Euler's deterministic steps).
        export: how grids become files. ``method``, ``threshold``, ``num_points``: 'refine' (the fine stage places
            points at localization precision) or a voxel export of :func:`scripts.data.voxelize.grid_to_points`;
            both draw voxels above ``threshold`` (``None``: for 'refine' the threshold the fine stage was trained
            with, :func:`scripts.networks.fine_stage.sampling_settings`; for a voxel export
            :data:`scripts.data.voxelize.EXPORT_THRESHOLD`); ``num_points`` ``None`` takes the training data's
            points per unit of grid mass. ``output_formats``: any of 'nifti', 'csv', 'h5'. ``preview``: write ``preview.png``,
            rendered at ``pixel_nm``.
        fine_stage: ``refiner`` and its ``checkpoint``, for ``method='refine'``; ``flow_steps``: its flow's steps
            (``None``: those it was validated with).
        field: ``size_nm``: the sampled field, [X, Y, Z] nm from the training box's minimum corner (``None``: the
            training box), rounded up to whole voxels of the training grid (less than one voxel on an axis is
            refused); ``tile_overlap`` and ``sw_batch_size``: the tiles of a field larger than the training box.
        Each group takes the defaults of :data:`GROUPS` for what it leaves out.
    """

    def __init__(
        self,
        autoencoder,
        unet,
        diffusion_checkpoint,
        output_dir,
        num_samples=8,
        batch_size=2,
        seed=0,
        device="cpu",
        amp=True,
        overwrite=False,
        denoising=None,
        export=None,
        fine_stage=None,
        field=None,
    ):
        settings = grouped(GROUPS, denoising=denoising, export=export, fine_stage=fine_stage, field=field)
        scheduler, num_inference_steps, eta, eta_below = (
            settings["denoising"][k] for k in ("scheduler", "num_inference_steps", "eta", "eta_below")
        )
        export = settings["export"]
        method, threshold, num_points = export["method"], export["threshold"], export["num_points"]
        output_formats, preview, pixel_nm = export["output_formats"], export["preview"], export["pixel_nm"]
        refiner, refiner_checkpoint, flow_steps = (
            settings["fine_stage"][k] for k in ("refiner", "checkpoint", "flow_steps")
        )
        field_size_nm, tile_overlap, sw_batch_size = (
            settings["field"][k] for k in ("size_nm", "tile_overlap", "sw_batch_size")
        )
        check_values(
            {"num_samples": num_samples, "batch_size": batch_size, "method": method, "num_points": num_points},
            "inference",
        )
        if method == "refine" and refiner is None:
            raise UserError(f"method: 'refine' needs the fine stage's checkpoint; {REFINER_HINT}")
        unknown = set(output_formats) - set(OUTPUT_FORMATS)
        if unknown:
            raise UserError(f"output_formats: unknown {sorted(unknown)}; choose from {', '.join(OUTPUT_FORMATS)}")
        self.output_dir = Path(output_dir)
        self.staged = StagedOutput(self.output_dir, "samples", SAMPLE_FILES, overwrite)
        self.staged.check()
        ckpt = diffusion_checkpoint
        self.info = info = ckpt["dataset_info"]
        self.geometry = GridGeometry.from_dict(info["geometry"])
        self.points_per_mass = (info.get("points_per_mass") or {}).get("mean")
        if num_points is None and self.points_per_mass is None and method in BY_MASS:
            raise UserError("num_points: the checkpoints hold no points-per-mass of the training data; set num_points")
        steps = num_inference_steps or ckpt["scheduler"]["num_train_timesteps"]
        self.scheduler = make_scheduler(
            ckpt["scheduler"], scheduler, steps, eta, eta_below, defaults=ckpt.get("sampling")
        )
        self.autoencoder, self.unet, self.scale_factor = autoencoder, unet, ckpt["scale_factor"]
        self.latent_shape = tuple(ckpt["latent_shape"])
        self.tile_overlap, self.sw_batch_size = tile_overlap, sw_batch_size
        self._plan_field(ckpt, field_size_nm)
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.method, self.num_points = method, num_points
        self.formats, self.preview, self.pixel_nm = tuple(output_formats), preview, pixel_nm
        self.device, self.amp_dtype = device, autocast_dtype(device, amp)
        self.refiner = refiner
        if refiner is not None:
            check_spacing(refiner_checkpoint, self.geometry, "the sampled grids")
            self.flow_steps, trained_threshold = sampling_settings(refiner_checkpoint, flow_steps)
        if threshold is None:
            threshold = trained_threshold if method == "refine" else EXPORT_THRESHOLD
        self.threshold = threshold
        self._check_memory(ckpt, refiner)
        self._check_disk(ckpt)
        points = f"the fine stage, {self.flow_steps} flow steps" if refiner is not None else f"{method} in voxels"
        points += f", from voxels above {threshold:g}"
        self.background = sampling_background(refiner_checkpoint) if method == "refine" else 0.0
        if self.background:
            points += f", background level {self.background:.2g}"
        recorded = ", as recorded with the weights" if eta is None and ckpt.get("sampling") else ""
        noise = ""
        if isinstance(self.scheduler, StochasticRFlowScheduler):
            noise = f" (eta {self.scheduler.eta:g} below noise level {self.scheduler.eta_below:g}{recorded})"
        elif isinstance(self.scheduler, RFlowScheduler):
            noise = f" (Euler's steps{recorded})"
        logger.info(f"sampling with {type(self.scheduler).__name__}{noise}, {steps} steps; points placed by {points}")
        if self.tiled:
            logger.info(
                f"field {self.geometry.describe()}: grid {list(self.geometry.shape)}, latent {list(self.field_latent)} "
                f"in tiles of {list(self.latent_shape[1:])} overlapping by {self.tile_overlap:g}"
            )

    def _plan_field(self, ckpt, field_size_nm):
        """The field's geometry (``self.geometry``: the training box, or ``field_size_nm`` from its minimum corner at
        the training voxels) and the latent it is sampled from (``self.field_latent``; ``self.tiled`` when it is
        larger than the UNet's training latent)."""
        training = self.geometry.with_shape(tuple(ckpt["voxel_size"]))
        spacing = training.spacing_nm
        field_nm = training.size_nm if field_size_nm is None else np.asarray(field_size_nm, np.float64)
        if field_nm.shape != (3,):
            raise UserError(f"field_size_nm: expected [X, Y, Z] in nm, got {field_size_nm!r}")
        if (field_nm < 0.99 * spacing).any():  # field_shapes takes a hundredth of a voxel over as rounding
            axes = ", ".join("xyz"[a] for a in np.flatnonzero(field_nm < 0.99 * spacing))
            raise UserError(
                f"field_size_nm: {field_nm.tolist()} nm is less than one voxel along {axes}; fields are whole voxels "
                f"of the training grid, the smallest is {np.round(spacing, 1).tolist()} nm"
            )
        factor = downsampling(ckpt["network_config"]["autoencoder"]["channels"])
        unet_factor = downsampling(ckpt["network_config"]["unet"]["channels"])
        grid, latent = field_shapes(field_nm, spacing, self.latent_shape[1:], factor, unet_factor)
        if field_size_nm is None:
            self.geometry = training
        else:
            self.geometry = GridGeometry(training.box_min_nm, tuple(training.lo + spacing * np.asarray(grid)), grid)
        self.field_latent, self.factor = latent, factor
        self.tiled = tuple(latent) != tuple(self.latent_shape[1:])

    def _points_per_sample(self, ckpt):
        """Points in one sample's cloud: ``num_points``, one per voxel ('center', 'random'), or the training data's
        density over the field."""
        if self.method in ONE_PER_VOXEL:
            return float(np.prod(self.geometry.shape, dtype=np.float64))
        if self.num_points is not None:
            return self.num_points
        info = ckpt["dataset_info"]
        counts, box = info.get("counts") or {}, GridGeometry.from_dict(info["geometry"])
        clouds = (counts.get("n_train") or 0) + (counts.get("n_val") or 0)
        density = counts.get("points_inside", 0) / max(clouds, 1) / float(np.prod(box.size_nm / 1000.0))
        return density * float(np.prod(self.geometry.size_nm / 1000.0))

    def _field(self):
        """What a sample's grid is, for messages: the field (``field_size_nm``) or one batch of the training box."""
        if self.tiled:
            field = f"field_size_nm: a {np.round(self.geometry.size_nm).astype(int).tolist()} nm field"
            return field, "sample a smaller field, or a smaller batch_size or sw_batch_size"
        n = min(self.batch_size, self.num_samples)
        return f"batch_size: a batch of {n} grids of {list(self.geometry.shape)} voxels", "set a smaller batch_size"

    def _check_memory(self, ckpt, refiner):
        """Refuse, before anything is sampled, a field, batch or point count whose estimated peak memory exceeds the
        machine's (one batch of grids and one cloud are held at a time, whatever ``num_samples``)."""
        chosen = self.num_points is not None and self.method not in ONE_PER_VOXEL
        points = self._points_per_sample(ckpt)
        host, device = sampling_memory(
            self.geometry.shape,
            (self.latent_shape[0], *self.field_latent),
            min(self.batch_size, self.num_samples),
            self.latent_shape[1:],
            self.sw_batch_size if self.tiled else 1,  # the training latent is denoised whole
            ckpt["network_config"],
            self.factor,
            refiner,
            0 if chosen else 2 * points,  # a chosen point count is checked on its own; the default may run denser
        )
        what, hint = self._field()
        if torch.device(self.device).type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            if device > total:
                raise UserError(
                    f"{what} needs about {device / 2**30:.3g} GiB on {torch.cuda.get_device_name(self.device)} "
                    f"(estimated), which has {total / 2**30:.3g} GiB; {hint}"
                )
        else:
            host, device = host + device, 0
        check_memory(host, what, hint)
        if chosen:
            check_point_memory(points, host, f"num_points: a cloud of {points} points")
            host += POINT_BYTES * points
        logger.info(f"estimated peak memory: {(host + device) / 2**30:.2f} GiB")

    def _check_disk(self, ckpt):
        """Refuse, before anything is written, samples whose files would not fit on the output folder's disk (the
        NIfTI counted before compression)."""
        per_point = CSV_POINT_BYTES * ("csv" in self.formats) + H5_POINT_BYTES * ("h5" in self.formats)
        voxels = float(np.prod(self.geometry.shape, dtype=np.float64))
        per_sample = per_point * self._points_per_sample(ckpt) + 4 * voxels * ("nifti" in self.formats)
        preview = PREVIEW_BYTES if self.preview else 0
        if self.num_points is not None and self.method not in ONE_PER_VOXEL:
            one, hint = f"num_points: a cloud of {self.num_points} points", "set a smaller num_points, or "
        elif self.tiled:
            one, hint = self._field()[0], "sample a smaller field, or "
        else:
            one, hint = "output_dir: one sample", ""
        check_disk(per_sample + preview, self.output_dir, one, f"{hint}write to another --output_dir")
        fit = round_down((free_disk_bytes(self.output_dir) - preview) // max(per_sample, 1))
        what = f"num_samples: writing {self.num_samples} samples"
        hint = f"at most about {fit} fit; sample fewer, or write to another --output_dir"
        check_disk(self.num_samples * per_sample + preview, self.output_dir, what, hint)

    def run(self):
        """Sample, write every file into a staging folder, then swap the whole set into ``output_dir``."""
        try:
            with self.staged as folder:
                self._run(folder)
        except KeyboardInterrupt as e:
            raise interrupted(e, f"no samples were written; {self.output_dir} is as it was") from None
        logger.info(f"wrote {self.num_samples} samples to {self.output_dir}")

    def _run(self, folder):
        """Sample batch by batch, writing each sample's files as it is made: nothing is kept of a sample but the
        preview's pictures of the first :data:`MAX_PREVIEW_ROWS`."""
        torch.manual_seed(self.seed)  # DDPM steps draw from the global generator
        if isinstance(self.scheduler, StochasticRFlowScheduler):  # its fresh noise from a generator of its own
            self.scheduler.generator = step_noise(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        rows = []
        h5 = PointCloudsH5Writer(folder / "pointcloud" / "samples.h5") if "h5" in self.formats else nullcontext()
        with h5 as writer:
            self._batches(folder, generator, rows, writer)
        if self.preview:
            self._write_preview(folder, rows)

    def _batches(self, folder, generator, rows, h5):
        for start in progress(range(0, self.num_samples, self.batch_size), "sampling", "batch", units="batches"):
            n = min(self.batch_size, self.num_samples - start)
            batch = (
                self._sample_field(n, generator)
                if self.tiled
                else sample_grids(
                    self.autoencoder,
                    self.unet,
                    self.scheduler,
                    self.scale_factor,
                    self.latent_shape,
                    n,
                    self.device,
                    generator,
                    self.amp_dtype,
                    verbose=interactive(),
                )
            )
            grids = batch[:, 0].clamp_(0, 1).numpy()
            for i, grid in enumerate(grids, start=start):
                grid = as_training_grid(grid, self.info, self.background)
                points = self._write(folder, i, grid)
                if h5 is not None:
                    h5.append(points, i)
                if self.preview and len(rows) < MAX_PREVIEW_ROWS:
                    rows.append(self._preview_row(grid, points))
                del points
            del batch, grids

    def _sample_field(self, n, generator):
        """``n`` grids (n, 1, X, Y, Z) of the field, float32 on the host: tiled denoising, sliding-window decoding."""
        noise = torch.randn((n, self.latent_shape[0], *self.field_latent), generator=generator)
        latent = denoise_tiled(
            self.unet,
            self.scheduler,
            noise,
            self.latent_shape[1:],
            self.tile_overlap,
            self.sw_batch_size,
            self.device,
            self.amp_dtype,
        )
        grids = decode_tiled(
            self.autoencoder,
            latent,
            self.scale_factor,
            decoding_window(self.latent_shape[1:]),
            tile_batch=self.sw_batch_size,
            device=self.device,
            amp_dtype=self.amp_dtype,
        )
        x, y, z = self.geometry.shape
        return grids[:, :, :x, :y, :z]

    def _write(self, folder, i, grid):
        geometry = self.geometry.with_shape(grid.shape)
        slab = refine_slab(grid.shape, self.refiner) if self.tiled and self.refiner is not None else None
        if "nifti" in self.formats:
            (folder / "nifti").mkdir(parents=True, exist_ok=True)
            save_nifti(folder / "nifti" / f"sample_{i:04d}.nii.gz", grid, geometry)
        if self.method == "refine":
            generator = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, i]).integers(2**62)))
            points = refine_grid(
                self.refiner,
                grid,
                geometry,
                self.num_points,
                self.threshold,
                self.flow_steps,
                generator,
                slab_voxels=slab,
                points_per_mass=self.points_per_mass,
            )
        else:
            points = grid_to_points(
                grid,
                geometry,
                self.method,
                self.threshold,
                self.num_points,
                self.points_per_mass,
                rng=np.random.default_rng([self.seed, i]),
            )
        if len(points) == 0:
            logger.warning(f"sample {i}: no voxel above threshold {self.threshold}; its point cloud is empty")
        if "csv" in self.formats:
            (folder / "pointcloud").mkdir(parents=True, exist_ok=True)
            write_points_csv(folder / "pointcloud" / f"sample_{i:04d}.csv", points)
        return points

    def _preview_row(self, grid, points):
        """One row of the preview, the pictures only: the grid's projections, the render of its points and their
        count."""
        box = [(self.geometry.box_min_nm[a], self.geometry.box_max_nm[a]) for a in range(3)]
        image, meta = render_points(points, self.pixel_nm, xy_range=box[:2], z_range=box[2])
        return projections(grid), image, meta, len(points)

    def _write_preview(self, folder, rows):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(rows), 2, figsize=(9, 3 * len(rows)), squeeze=False)
        for r, (picture, image, meta, count) in enumerate(rows):
            axes[r, 0].imshow(picture, cmap="magma", vmin=0, vmax=1)
            axes[r, 0].set_title(f"sample {r}: maximum projections: xy, xz below, zy right", fontsize=8)
            axes[r, 1].imshow(image)
            axes[r, 1].set_title(f"{count} points, {self.pixel_nm:g} nm pixels, bar {meta['bar_nm']} nm", fontsize=8)
            for ax in axes[r]:
                ax.axis("off")
        fig.tight_layout()
        with atomic_path(folder / "preview.png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
