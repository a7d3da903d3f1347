"""Evaluation of generated samples against the held-out real set. Used by ``configs/evaluate.json``.

Each set is compared with the held-out clouds (``val_points.h5`` and ``val/``, or a separate reference file such as
a freshly simulated test set, voxelized as the dataset was), so that the model's numbers sit between a ceiling and
a floor:

- ``train_vs_heldout``: training clouds: what a perfect model scores (the floor of every distance);
- ``reconstruction``: the autoencoder's reconstructions of the held-out grids, exported to points uniformly inside
  voxels; ``reconstruction_refined``: the same grids through the fine stage (the ceiling of stage 2);
- ``mean_grid_baseline``: points drawn from the mean training grid: a trivial model;
- ``samples``: the model's samples (``pointcloud/*.csv`` and ``nifti/*.nii.gz`` of ``configs/inference.json``);
  ``samples_voxel_uniform``: the same sample grids exported uniformly inside voxels (the reference of the fine
  stage), when a fine stage is given.

Sets are balanced: every row uses as many clouds as the smallest of the held-out, training and sample sets.

Writes ``metrics.json``, ``metrics.md`` and four PNG figures to ``output_dir``; metric definitions are in
:mod:`scripts.evaluation.metrics`.
"""

import json
import logging
from pathlib import Path

import numpy as np
import torch
from scripts.data.datasets import list_volumes, load_dataset_info, resize_grid, volume_transforms
from scripts.data.geometry import GridGeometry
from scripts.data.pointclouds import read_point_clouds
from scripts.data.voxelize import EXPORT_THRESHOLD, as_training_grid, grid_to_points, voxelize_like
from scripts.evaluation.inputs import check_folders, check_reference, check_trained_box, find_samples, read_samples
from scripts.evaluation.metrics import (
    box_normalize,
    chamfer_matrix,
    compare_distributions,
    dice_iou,
    emd_set_blocks,
    foreground_statistics,
    psnr,
    set_metrics,
    subsample,
)
from scripts.evaluation.realism import classifier_two_sample_test, realism_by_statistic, set_statistics
from scripts.evaluation.report import markdown_report, write_figures
from scripts.networks.fine_stage import check_spacing, refine_grid, sampling_background, sampling_settings
from scripts.runtime.errors import UserError
from scripts.runtime.output_folders import StagedOutput
from scripts.runtime.settings import BY_MASS, check_values, grouped

logger = logging.getLogger(__name__)
EVALUATION_FILES = ("metrics.json", "metrics.md", "*.png")
GROUPS = {  # the Evaluation's settings by group, with their defaults
    "reference": {"file": None, "box_tolerance": 0.1, "max_clouds": None},
    "metrics": {
        "num_points": 2048,
        "emd_points": 512,
        "structure_radius_nm": 150.0,
        "pair_range_nm": (20.0, 500.0),
        "nn_bins": 60,
        "z_bins": 30,
        "realism_test": True,
        "realism_folds": 5,
    },
    "export": {"threshold": EXPORT_THRESHOLD, "method": "probabilistic", "num_points": None},
    "fine_stage": {"refiner": None, "checkpoint": None, "flow_steps": None},
    "pictures": {"num_pictures": 6, "pixel_nm": 15.0},
}
ROWS = {
    "train_vs_heldout": "training clouds (what a perfect model scores)",
    "reconstruction": "autoencoder reconstructions of the held-out grids, points uniform inside voxels",
    "reconstruction_refined": "the same reconstructions through the fine stage (the ceiling of stage 2)",
    "mean_grid_baseline": "points drawn from the mean training grid (a trivial model)",
    "samples": "the model's samples",
    "samples_voxel_uniform": "the samples' grids, points uniform inside voxels (the fine stage's reference)",
}


class Evaluation:
    """Compares generated samples with the held-out set and writes ``metrics.json``, ``metrics.md`` and figures.

    Args:
        dataset_dir: the converter's output folder (``dataset_info.json``, ``train/``, ``val/``,
            ``train_points.h5``, ``val_points.h5``).
        samples_dir: the sampler's output folder (``pointcloud/*.csv``, or ``pointcloud/samples.h5``, and
            optionally ``nifti/*.nii.gz``).
        autoencoder_checkpoint, autoencoder, autoencoder_path: the stage-1 checkpoint, its frozen network, its file.
        output_dir: where the results go (created; an earlier evaluation there is refused unless ``overwrite``).
        sets: the rows to compute (names of :data:`ROWS`); ``None``: all (the refined and voxel-uniform rows need a
            fine stage).
        seed: seeds every subsample and export.
        batch_size: volumes per autoencoder forward pass.
        num_workers: threads per KD-tree query (-1: all cores).
        device: where the autoencoder runs.
        overwrite: replace an earlier evaluation in ``output_dir`` (only its own files).
        reference: the clouds compared with. ``file``: held-out clouds to use instead of ``val_points.h5`` (any
            readable point-cloud file; grids are made of them as the dataset's were); ``None``: the validation
            split. Refused when its clouds span another box than the training clouds (each corner to
            ``box_tolerance`` of the training box's side; 0.1: 500 nm on a 5 µm side), or a cloud holds fewer than 2
            distinct points. ``max_clouds``: use at most this many of them (seeded choice); ``None``: all.
        metrics: ``num_points``: points per cloud for MMD/COV/1-NNA under Chamfer distance (clouds are subsampled,
            seeded); ``emd_points``: points per cloud for EMD (the first ``emd_points`` of each subsample; 0 or
            ``None`` skips EMD: ``--emd_points 0`` on the command line, where MONAI drops ``None`` overrides);
            ``structure_radius_nm``: the neighbourhood of the linearity and planarity statistics;
            ``pair_range_nm``: ``[r_min, r_max]`` of the pair-distance statistic (and of Ripley's L); ``nn_bins``,
            ``z_bins``: histogram bins of the nearest-neighbour distance and of the z profile; ``realism_test``:
            add each set's classifier two-sample test against the held-out clouds (the cross-validated accuracy of
            a logistic regression on per-cloud statistics, see
            :func:`scripts.evaluation.realism.classifier_two_sample_test`; 50 %: indistinguishable, 100 %: always
            told apart), with ``realism_folds`` cross-validation folds (at most the clouds per set), and the same
            test on each statistic alone (:func:`scripts.evaluation.realism.realism_by_statistic`).
        export: how reconstructed grids become points: ``threshold`` (foreground of grid values in [0, 1], also for
            Dice, IoU, the foreground fraction and intensities), ``method`` (see
            :func:`scripts.data.voxelize.grid_to_points`), ``num_points`` (``None``: the training data's points per
            unit of grid mass, as the sampler does).
        fine_stage: ``refiner`` and its ``checkpoint`` (they add the refined and voxel-uniform rows), or ``None``;
            ``flow_steps``: its flow's steps (``None``: those of its checkpoint). It places points from the voxels
            above the threshold it was trained with, as the sampler does by default, whatever ``threshold``.
        pictures: ``num_pictures`` clouds and grids shown per set in the figures (``renderings.png``: held-out
            above, generated below, one renderer and scale), rendered at ``pixel_nm``.
        Each group takes the defaults of :data:`GROUPS` for what it leaves out.
    """

    def __init__(
        self,
        dataset_dir,
        samples_dir,
        autoencoder_checkpoint,
        autoencoder,
        autoencoder_path,
        output_dir,
        sets=None,
        seed=0,
        batch_size=2,
        num_workers=1,
        device="cpu",
        overwrite=False,
        reference=None,
        metrics=None,
        export=None,
        fine_stage=None,
        pictures=None,
    ):
        self.dataset_dir, self.samples_dir, self.output_dir = Path(dataset_dir), Path(samples_dir), Path(output_dir)
        groups = grouped(
            GROUPS, reference=reference, metrics=metrics, export=export, fine_stage=fine_stage, pictures=pictures
        )
        reference, metrics, export, fine_stage = (groups[k] for k in ("reference", "metrics", "export", "fine_stage"))
        checked = check_values(
            {
                **{k: metrics[k] for k in ("num_points", "emd_points", "structure_radius_nm", "pair_range_nm")},
                **{k: metrics[k] for k in ("realism_test", "realism_folds")},
                "reference_box_tolerance": reference["box_tolerance"],
                "num_pictures": groups["pictures"]["num_pictures"],
                "batch_size": batch_size,
                "sets": sets,
            },
            "evaluate",
        )
        num_points, emd_points = metrics["num_points"], metrics["emd_points"]
        if emd_points is not None and emd_points > num_points:
            raise UserError(
                f"emd_points: must be an integer in [0, num_points={num_points}] or null, got {emd_points!r}"
            )
        check_folders(self.dataset_dir, self.samples_dir)
        self.staged = StagedOutput(self.output_dir, "an evaluation", EVALUATION_FILES, overwrite)
        self.staged.check()
        self.sample_files, self.sample_grid_files = find_samples(self.samples_dir)
        self.info = load_dataset_info(self.dataset_dir / "val")
        self.geometry = GridGeometry.from_dict(self.info["geometry"])
        check_trained_box(autoencoder_checkpoint, autoencoder_path, self.geometry, self.dataset_dir)
        self.points_per_mass = (self.info.get("points_per_mass") or {}).get("mean")
        self.threshold, self.method, self.export_num_points = (
            export["threshold"],
            export["method"],
            export["num_points"],
        )
        if self.export_num_points is None and self.points_per_mass is None and self.method in BY_MASS:
            raise UserError(f"export_num_points: {self.dataset_dir} records no points per mass; set export_num_points")
        self.autoencoder, self.device = autoencoder, device
        self.voxel_size = tuple(autoencoder_checkpoint["voxel_size"])
        self.num_points, self.emd_points, self.seed = num_points, emd_points or None, seed
        self.max_reference_clouds, self.batch_size = reference["max_clouds"], batch_size
        self.num_pictures, self.pixel_nm = groups["pictures"]["num_pictures"], groups["pictures"]["pixel_nm"]
        self.nn_bins, self.z_bins = metrics["nn_bins"], metrics["z_bins"]
        self.workers = num_workers
        self.reference_file = Path(reference["file"]) if reference["file"] else None
        self.reference_box_tolerance = checked["reference_box_tolerance"]
        if self.reference_file is not None and not self.reference_file.is_file():
            raise UserError(f"{self.reference_file}: reference_file names no such file")
        self.refiner = fine_stage["refiner"]
        if self.refiner is not None:
            check_spacing(
                fine_stage["checkpoint"], self.geometry.with_shape(self.voxel_size), "the autoencoder's grids"
            )
            self.flow_steps, self.anchor_threshold = sampling_settings(
                fine_stage["checkpoint"], fine_stage["flow_steps"]
            )
            self.background = sampling_background(fine_stage["checkpoint"])
        self.structure_radius_nm = float(metrics["structure_radius_nm"])
        self.pair_range_nm = tuple(map(float, metrics["pair_range_nm"]))
        self.sets = checked["sets"]
        self.realism_test, self.realism_folds = checked["realism_test"], checked["realism_folds"]

    # ------------------------------------------------------------------------------------------------ inputs

    def _rng(self, *stream):
        return np.random.default_rng([self.seed, *stream])

    def _inside(self, clouds):
        return [c[self.geometry.inside(c)] for c in clouds]

    def _grids(self, datalist):
        transform = volume_transforms(self.voxel_size)
        return [transform(dict(d))["image"][0].numpy() for d in datalist]

    def _heldout(self):
        if self.reference_file is not None:
            clouds = read_point_clouds(self.reference_file)[0]
            check_reference(
                clouds,
                self.reference_file,
                self.dataset_dir,
                self.geometry,
                self.voxel_size,
                self.reference_box_tolerance,
            )
            clouds = self._inside(clouds)
            clouds = self._at_most(clouds, self.max_reference_clouds, 0)
            grids = [resize_grid(voxelize_like(c, self.info), self.voxel_size) for c in clouds]
            return clouds, grids
        clouds, _ = read_point_clouds(self.dataset_dir / "val_points.h5")
        volumes = list_volumes(self.dataset_dir / "val", "validation folder")
        if len(clouds) != len(volumes):
            raise UserError(
                f"{self.dataset_dir}: val_points.h5 holds {len(clouds)} clouds but val/ {len(volumes)} volumes; "
                f"convert again"
            )
        keep = np.arange(len(clouds))
        if self.max_reference_clouds and len(clouds) > self.max_reference_clouds:
            keep = np.sort(self._rng(0).choice(len(clouds), self.max_reference_clouds, replace=False))
        return self._inside([clouds[i] for i in keep]), self._grids([volumes[i] for i in keep])

    def _at_most(self, items, n, stream):
        if n is None or len(items) <= n:
            return items
        return [items[i] for i in np.sort(self._rng(stream).choice(len(items), n, replace=False))]

    def _refine(self, grid, stream):
        generator = torch.Generator().manual_seed(int(self._rng(*stream).integers(2**62)))
        return refine_grid(
            self.refiner,
            grid,
            self.geometry,
            self.export_num_points,
            self.anchor_threshold,
            self.flow_steps,
            generator,
            points_per_mass=self.points_per_mass,
        )

    def _training(self, n):
        clouds, _ = read_point_clouds(self.dataset_dir / "train_points.h5")
        volumes = list_volumes(self.dataset_dir / "train", "training folder")
        grids = self._grids(volumes)
        keep = np.sort(self._rng(1).choice(len(clouds), min(n, len(clouds)), replace=False))
        subset = self._inside([clouds[i] for i in keep])
        subset_grids = [grids[i] for i in keep] if len(grids) == len(clouds) else None
        return subset, subset_grids, np.mean(grids, axis=0)

    def _export(self, grid, threshold, stream):
        return grid_to_points(
            grid,
            self.geometry,
            self.method,
            threshold,
            self.export_num_points,
            self.points_per_mass,
            rng=self._rng(*stream),
        )

    def _reconstruct(self, grids):
        out = []
        with torch.no_grad():
            for start in range(0, len(grids), self.batch_size):
                batch = torch.from_numpy(np.stack(grids[start : start + self.batch_size]))[:, None].to(self.device)
                out += list(self.autoencoder.reconstruct(batch).float().clamp(0, 1)[:, 0].cpu().numpy())
        return out

    # ------------------------------------------------------------------------------------------------ metrics

    def _prepare(self, clouds, stream):
        """Box-normalised subsamples (Chamfer) and their first ``emd_points`` rows (EMD) of the non-empty clouds."""
        rng = self._rng(*stream)
        full = [box_normalize(subsample(c, self.num_points, rng), self.geometry) for c in clouds if len(c)]
        return full, [c[: self.emd_points] for c in full] if self.emd_points else None

    def _point_metrics(self, clouds, reference, stream):
        """MMD, COV and 1-NNA under CD (and EMD) of the non-empty ``clouds`` against the held-out clouds."""
        full, small = self._prepare(clouds, stream)
        row = {"n_generated": len(full), "n_reference": len(reference["cd_clouds"]), "n_empty": len(clouds) - len(full)}
        if full:
            cross = chamfer_matrix(full, reference["cd_clouds"], workers=self.workers)
            row["cd"] = set_metrics(chamfer_matrix(full, workers=self.workers), reference["cd"], cross)
            if small is not None:
                *blocks, n_exact = emd_set_blocks(small, reference["emd_clouds"], self.workers, reference["emd_cache"])
                row[f"emd{self.emd_points}"] = set_metrics(*blocks)
                n = len(small) + len(reference["emd_clouds"])
                logger.info(f"EMD: {n_exact} new exact assignments for the {n * (n - 1) // 2} pairs of the union")
        return row

    # ------------------------------------------------------------------------------------------------ run

    def run(self):
        logger.info(f"reading the held-out set of {self.reference_file or self.dataset_dir}")
        real_clouds, real_grids = self._heldout()
        sample_clouds, sample_grids = read_samples(
            self.sample_files, self.sample_grid_files, self.geometry, self.voxel_size, self.dataset_dir
        )
        n = min(len(real_clouds), len(sample_clouds), len(read_point_clouds(self.dataset_dir / "train_points.h5")[0]))
        if n < max(len(real_clouds), len(sample_clouds)):
            logger.warning(
                f"balancing the sets: {n} clouds each (held-out {len(real_clouds)}, samples {len(sample_clouds)}); "
                "sample as many clouds as are held out"
            )
        keep = self._at_most(list(range(len(real_clouds))), n, 0)
        real_clouds, real_grids = [real_clouds[i] for i in keep], [real_grids[i] for i in keep]
        sample_clouds = self._at_most(sample_clouds, n, 6)
        sample_grids = self._at_most(sample_grids, n, 6) if sample_grids else None  # the same draw when paired
        train_clouds, train_grids, mean_grid = self._training(n)
        logger.info(f"reconstructing {len(real_grids)} held-out grids")
        recon_grids = self._reconstruct(real_grids)
        sets = self._build_sets(n, train_clouds, train_grids, mean_grid, recon_grids, sample_clouds, sample_grids)
        rows, curves = self._score(sets, real_clouds, real_grids)
        per_volume = [{**dice_iou(r, g, self.threshold), "psnr": psnr(r, g)} for r, g in zip(recon_grids, real_grids)]
        reconstructions = {
            k: {"mean": float(np.mean([v[k] for v in per_volume])), "std": float(np.std([v[k] for v in per_volume]))}
            for k in ("dice", "iou", "psnr")
        }
        results = {"settings": self._settings(len(real_clouds)), "rows": rows, "reconstruction_grids": reconstructions}
        with self.staged as folder:
            (folder / "metrics.json").write_text(json.dumps(results, indent=4) + "\n")
            (folder / "metrics.md").write_text(markdown_report(results))
            write_figures(folder, self, real_clouds, real_grids, recon_grids, sample_clouds, sample_grids, curves, rows)
        logger.info(f"wrote metrics.json, metrics.md and figures to {self.output_dir}")
        return results

    def _build_sets(self, n, train_clouds, train_grids, mean_grid, recon_grids, sample_clouds, sample_grids):
        """``{row name: (clouds, grids)}`` for the rows asked for (:data:`ROWS`) that can be computed."""
        builders = {
            "train_vs_heldout": lambda: (train_clouds, train_grids),
            "reconstruction": lambda: (
                [self._export(g, self.threshold, (2, i)) for i, g in enumerate(recon_grids)],
                recon_grids,
            ),
            # on the training grids' scale, as the sampler puts its decoded grids
            "reconstruction_refined": lambda: (
                [
                    self._refine(as_training_grid(g, self.info, self.background), (7, i))
                    for i, g in enumerate(recon_grids)
                ],
                recon_grids,
            ),
            # the mean grid is faint and diffuse: every voxel takes part, whatever the threshold
            "mean_grid_baseline": lambda: ([self._export(mean_grid, 0.0, (3, i)) for i in range(n)], [mean_grid]),
            "samples": lambda: (sample_clouds, sample_grids),
            "samples_voxel_uniform": lambda: (
                [self._export(g, self.threshold, (8, i)) for i, g in enumerate(sample_grids)],
                sample_grids,
            ),
        }
        available = {
            "reconstruction_refined": self.refiner is not None,
            "samples_voxel_uniform": self.refiner is not None and bool(sample_grids),
        }
        return {name: builders[name]() for name in self.sets or ROWS if available.get(name, True)}

    def _score(self, sets, real_clouds, real_grids):
        """Every set's metrics against the held-out clouds (and grids), and the curves of the figures."""
        full, small = self._prepare(real_clouds, (4,))
        reference = {"cd_clouds": full, "cd": chamfer_matrix(full, workers=self.workers)}
        if small is not None:
            reference.update(emd_clouds=small, emd_cache={})
        real, real_features = set_statistics(real_clouds, self.structure_radius_nm, self.pair_range_nm, self._rng(9))
        rows, curves = {}, {key: {"held-out": values} for key, values in real.items()}
        for k, (name, (clouds, grids)) in enumerate(sets.items()):
            logger.info(f"{name}: {len(clouds)} clouds against {len(real_clouds)} held-out clouds")
            row = self._point_metrics(clouds, reference, (5, k))
            clouds_in = [c for c in clouds if len(c)]
            stats, features = set_statistics(clouds_in, self.structure_radius_nm, self.pair_range_nm, self._rng(10 + k))
            for key, values in stats.items():
                row[key] = compare_distributions(values, real[key])
                curves[key][name] = values
            if self.realism_test:
                seed = [self.seed, 11, k]
                row["realism"] = classifier_two_sample_test(features, real_features, self.realism_folds, seed)
                row["realism"]["by_statistic"] = realism_by_statistic(features, real_features, self.realism_folds, seed)
            if grids is not None:
                row.update(foreground_statistics(grids, real_grids, self.threshold))
            rows[name] = row
        return rows, curves

    def _settings(self, n_reference):
        return {
            "dataset_dir": str(self.dataset_dir),
            "samples_dir": str(self.samples_dir),
            "n_heldout": n_reference,
            "num_points": self.num_points,
            "emd_points": self.emd_points,
            "seed": self.seed,
            "threshold": self.threshold,
            "export_method": self.method,
            "fine_stage_threshold": self.anchor_threshold if self.refiner is not None else None,
            "voxel_size": list(self.voxel_size),
            "normalization": "points minus the training box centre, divided by its largest extent",
            "largest_extent_nm": float(self.geometry.size_nm.max()),
            "chamfer": "sum of the two mean squared nearest-neighbour distances (normalised units squared)",
            "emd": "mean Euclidean distance under the exact optimal assignment (normalised units)",
            "1nna": "mean of the leave-one-out 1-NN accuracies on the generated and on the held-out clouds",
            "reference": str(self.reference_file) if self.reference_file else "val_points.h5",
            "structure_radius_nm": self.structure_radius_nm,
            "pair_range_nm": list(self.pair_range_nm),
            "realism_folds": self.realism_folds if self.realism_test else None,
            "realism": "classifier two-sample test: held-out accuracy of an L2-regularised logistic regression on "
            "per-cloud statistics (NN distance, z, linearity and planarity quantiles, pair-distance histogram, point "
            "count) telling the set's clouds from as many held-out ones, cross-validated; by_statistic: the same test "
            "on each statistic's features alone",
            "rows": ROWS,
        }
