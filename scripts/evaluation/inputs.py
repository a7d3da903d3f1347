"""What an evaluation reads, checked before it is used: the converter's dataset folder, the sampler's output folder
and a reference file of held-out clouds. Each refusal names the file and what to do (used by
:class:`scripts.evaluation.evaluator.Evaluation`)."""

import numpy as np
from scripts.data.geometry import GridGeometry
from scripts.data.nifti import load_nifti
from scripts.data.pointclouds import read_point_clouds
from scripts.runtime.errors import UserError
from scripts.runtime.output_folders import listed_files

CONVERT_HINT = "convert point clouds with scripts/convert_h5_to_nifti.py first"
SAMPLE_HINT = "sample first: python -m monai.bundle run --config_file configs/inference.json"


def check_folders(dataset_dir, samples_dir):
    """Refuse a dataset folder without its clouds and split, or a missing samples folder."""
    if not dataset_dir.is_dir():
        raise UserError(f"{dataset_dir}: no such dataset folder; {CONVERT_HINT}")
    for name in ("dataset_info.json", "val_points.h5", "train_points.h5"):
        if not (dataset_dir / name).is_file():
            raise UserError(f"{dataset_dir / name}: no such file; {CONVERT_HINT} (with a validation split)")
    if not samples_dir.is_dir():
        raise UserError(f"{samples_dir}: no such samples folder; {SAMPLE_HINT}")


def check_trained_box(autoencoder_checkpoint, autoencoder_path, geometry, dataset_dir):
    """Refuse an autoencoder trained on data of another box than ``dataset_dir`` (of ``geometry``)."""
    trained_on = (autoencoder_checkpoint.get("dataset_info") or {}).get("geometry")
    if trained_on and not GridGeometry.from_dict(trained_on).same_box(geometry):
        raise UserError(
            f"{autoencoder_path}: was trained on data in another box ({trained_on['box_min_nm']} to "
            f"{trained_on['box_max_nm']} nm) than {dataset_dir} ({list(geometry.box_min_nm)} to "
            f"{list(geometry.box_max_nm)} nm)"
        )


def find_samples(samples_dir):
    """The sample clouds (and grids) of one sampling run: those its manifest lists, else what the folders hold."""
    listed = listed_files(samples_dir)
    if listed is not None:
        files = [samples_dir / f for f in listed if f.startswith("pointcloud/") and f.endswith(".csv")]
        grid_files = [samples_dir / f for f in listed if f.startswith("nifti/")]
    else:
        files = sorted((samples_dir / "pointcloud").glob("*.csv"))
        folder = samples_dir / "nifti"
        grid_files = sorted(p for p in folder.glob("*.nii*") if p.name.endswith((".nii", ".nii.gz")))
    if not files and (samples_dir / "pointcloud" / "samples.h5").is_file():
        files = [samples_dir / "pointcloud" / "samples.h5"]
    if not files:
        raise UserError(f"{samples_dir / 'pointcloud'}: no sample point clouds (*.csv); {SAMPLE_HINT}")
    return files, grid_files


def read_samples(files, grid_files, geometry, voxel_size, dataset_dir):
    """The clouds of ``files`` (an empty CSV counts as an empty cloud) and the grids of ``grid_files`` (``None`` when
    there are none); a grid of another box than ``geometry`` or another shape than ``voxel_size`` is refused."""
    clouds = []
    for path in files:
        if path.suffix == ".csv" and not _has_rows(path):
            clouds.append(np.zeros((0, 3)))  # an empty sample is counted, not refused
        else:
            clouds += read_point_clouds(path)[0]
    grids = []
    for path in grid_files:
        grid, grid_geometry = load_nifti(path)
        if not grid_geometry.same_box(geometry):
            raise UserError(
                f"{path}: covers {list(grid_geometry.box_min_nm)} to {list(grid_geometry.box_max_nm)} nm, not the "
                f"training box of {dataset_dir}; evaluate against the data the model was trained on"
            )
        if grid.shape != voxel_size:
            raise UserError(
                f"{path}: has shape {grid.shape}, the autoencoder's grids {voxel_size}; evaluate with the "
                f"autoencoder that made the samples"
            )
        grids.append(grid)
    return clouds, grids or None


def check_reference(clouds, reference_file, dataset_dir, geometry, voxel_size, box_tolerance):
    """Refuse reference clouds with fewer than 2 distinct points (in the box of ``geometry``), or that span another
    box than the training clouds of ``dataset_dir`` (each corner to ``box_tolerance`` of the training box's side)."""
    few = "{}: cloud {} has {} distinct point{} {}; each reference cloud needs at least 2 to be compared"
    for i, cloud in enumerate(clouds):
        if len(cloud) < 2 or not np.ptp(cloud, axis=0).any():
            raise UserError(few.format(reference_file, i, 1, "", f"({len(cloud)} in all)"))
    trained = GridGeometry.around(read_point_clouds(dataset_dir / "train_points.h5")[0], voxel_size)
    reference = GridGeometry.around(clouds, voxel_size)
    if not reference.same_box(trained, box_tolerance * trained.size_nm):
        raise UserError(
            f"{reference_file}: its clouds span {reference.describe()}, but the training clouds of "
            f"{dataset_dir} span {trained.describe()} (reference_box_tolerance "
            f"{box_tolerance:g} of each side); evaluate against clouds of the training box"
        )
    for i, cloud in enumerate(clouds):
        n = len(np.unique(cloud[geometry.inside(cloud)], axis=0))
        if n < 2:
            where = f"inside the box of {dataset_dir}"
            raise UserError(few.format(reference_file, i, n, "" if n == 1 else "s", where))


def _has_rows(csv_path):
    with open(csv_path, errors="replace") as f:
        f.readline()
        return any(line.strip() for line in f)
