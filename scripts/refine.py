"""The fine stage on its own: a grid in (NIfTI, its geometry in the affine), points at localization precision out
(CSV in nm, inside the grid's box)::

    python scripts/refine.py --grid outputs/samples/nifti/sample_0000.nii.gz --output sample_0000_refined.csv

Works on any grid of the voxel size the fine stage was trained on: a generated one, or a real one converted by
``scripts/convert_h5_to_nifti.py``.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from scripts.data.nifti import load_nifti  # noqa: E402
from scripts.data.pointclouds import CSV_POINT_BYTES, write_points_csv  # noqa: E402
from scripts.data.voxelize import point_count  # noqa: E402
from scripts.networks.fine_stage import (  # noqa: E402
    check_grid,
    check_point_memory,
    check_spacing,
    refine_grid,
    refine_memory,
    refine_slab,
    sampling_settings,
)
from scripts.networks.trained import (  # noqa: E402
    checkpoint_path,
    default_model_dir,
    load_refiner_checkpoint,
    trained_refiner,
)
from scripts.runtime.command_line import main  # noqa: E402
from scripts.runtime.errors import UserError  # noqa: E402
from scripts.runtime.resources import check_disk  # noqa: E402
from scripts.runtime.settings import check_values  # noqa: E402


def refine(grid, refiner=None, output=None, num_points=None, threshold=None, flow_steps=None, seed=0, overwrite=False):
    """Turn ``grid`` into a point cloud with the fine stage's checkpoint ``refiner``.

    Args:
        grid: a NIfTI volume (values in [0, 1]; a grid with a larger maximum is divided by it, as the converter's
            default normalisation does). A grid with NaN, infinite or negative voxels, or none above ``threshold``,
            is refused.
        refiner: the fine stage's checkpoint (``None``: the trained one in ``outputs/``, else the shipped one).
        output: the CSV to write (default: ``grid`` with ``.csv``); refused if it exists, unless ``overwrite``.
        num_points: how many points (default: the training data's points per unit of grid mass); refused, with
            how many would fit, when they would not fit in memory or on the output's disk.
        threshold: only voxels above it anchor points (default: the threshold the fine stage was trained with, 0).
        flow_steps: Euler steps of the flow (default: those the checkpoint was validated with).
        seed: the same seed writes the same file.
    """
    check_values({"num_points": num_points, "threshold": threshold, "seed": seed}, "inference")
    if flow_steps is not None:
        check_values({"flow_steps": flow_steps}, "train_refiner")
    grid_path = Path(grid)
    output = Path(output) if output else grid_path.with_name(grid_path.name.split(".nii")[0] + ".csv")
    if output.exists() and not overwrite:
        raise UserError(f"{output}: already exists; pass --overwrite true to replace it")
    values, geometry = load_nifti(grid_path)
    check_grid(values, grid_path)
    if values.max() > 1:
        values = values / values.max()
    refiner = refiner or checkpoint_path(default_model_dir("."), "refiner")
    checkpoint = load_refiner_checkpoint(refiner)
    steps, threshold = sampling_settings(checkpoint, flow_steps, threshold)
    if not (values > threshold).any():
        raise UserError(
            f"{grid_path}: no voxel is above threshold {threshold:g} (the largest is {values.max():.3g}), so there "
            "is nothing to place points on" + ("; lower --threshold" if values.max() > 0 else "")
        )
    check_spacing(checkpoint, geometry, grid_path)
    network = trained_refiner(checkpoint, refiner)
    ppm = (checkpoint["dataset_info"].get("points_per_mass") or {}).get("mean")
    n = point_count(values, geometry, num_points, ppm)
    what = f"num_points: a cloud of {n} points" + ("" if num_points else " (the training data's density)")
    check_point_memory(n, refine_memory(values.shape, network, 0), what)
    check_disk(CSV_POINT_BYTES * n, output.parent, what, "set a smaller num_points or write the CSV elsewhere")
    generator = torch.Generator().manual_seed(int(seed))
    slab = refine_slab(values.shape, network)
    points = refine_grid(network, values, geometry, n, threshold, steps, generator, 4, slab)
    write_points_csv(output, points)
    print(f"wrote {len(points)} points to {output} (nm, inside the box of {grid_path.name})")


if __name__ == "__main__":
    main(refine)
