"""Convert point clouds to NIfTI grids for training, with their geometry in ``dataset_info.json``.

Usage from the bundle root::

    python scripts/convert_h5_to_nifti.py --h5_file F --output_dir D --voxel_size 64 --method gaussian --sigma 1.0

Writes ``D/train/*.nii.gz``, ``D/val/*.nii.gz``, ``D/train_points.h5``, ``D/val_points.h5`` and
``D/dataset_info.json``. Everything is written to a temporary folder first and moved into place at the end,
so a failure leaves ``D`` as it was.
"""

import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from scripts.errors import UserError, exit_on_user_error  # noqa: E402
from scripts.geometry import GridGeometry, as_shape, as_triple  # noqa: E402
from scripts.pointcloud_io import read_point_clouds, write_point_clouds_h5  # noqa: E402
from scripts.volume_io import save_nifti  # noqa: E402
from scripts.voxelize import (  # noqa: E402
    grid_mass_um3,
    normalize_,
    sigma_in_voxels,
    voxelize,
)

OUTPUTS = ("train", "val", "train_points.h5", "val_points.h5", "dataset_info.json")
PERCENTILE_SAMPLES = 100_000  # non-zero voxel values drawn per grid to estimate a dataset-wide percentile


def cut_tiles(clouds, n_tiles, tile_size_nm, seed=0, min_points=10):
    """Cut ``n_tiles`` random boxes of ``tile_size_nm`` (x, y, z) out of the clouds, each rotated by a random
    angle about z and re-origined so the tile spans ``[0, tile_size_nm]``. Returns the tiles and the source
    cloud index of each."""
    size = as_triple(tile_size_nm, "tile_size")
    if np.any(size <= 0):
        raise UserError(f"tile_size: must be positive, got {tile_size_nm!r}")
    rng = np.random.default_rng(seed)
    tiles, sources = [], []
    for _ in range(n_tiles):
        for _attempt in range(100):
            src = int(rng.integers(len(clouds)))
            pts = clouds[src]
            lo, hi = pts.min(axis=0), pts.max(axis=0)
            centre = rng.uniform(lo, hi)
            centre[2] = (lo[2] + hi[2]) / 2
            angle = rng.uniform(0, 2 * np.pi)
            c, s = np.cos(angle), np.sin(angle)
            rel = pts - centre
            local = np.column_stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2]])
            local += size / 2
            keep = np.all((local >= 0) & (local <= size), axis=1)
            if keep.sum() >= min_points:
                tiles.append(local[keep])
                sources.append(src)
                break
        else:
            raise UserError(f"tile_size: no box of {list(size)} nm holds {min_points} points after 100 tries")
    return tiles, sources


def _grid(cloud, geometry, method, sigma_voxels):
    grid, n_outside = voxelize(cloud, geometry, method, sigma_voxels)
    return grid, len(cloud) - n_outside, n_outside


def _percentile_sample(job):
    cloud, geometry, method, sigma_voxels, seed = job
    grid = _grid(cloud, geometry, method, sigma_voxels)[0]
    values = grid[grid > 0]
    return np.random.default_rng(seed).choice(values, min(len(values), PERCENTILE_SAMPLES), replace=False)


def _convert_one(job):
    cloud, path, geometry, method, sigma_voxels, rule, constant = job
    grid, n_inside, n_outside = _grid(cloud, geometry, method, sigma_voxels)
    if n_inside == 0:
        return {"name": path.name, "points": 0, "outside": n_outside}
    scale = normalize_(grid, rule, constant)
    save_nifti(path, grid, geometry)
    mass = grid_mass_um3(grid, geometry)
    return {"name": path.name, "points": n_inside, "outside": n_outside, "scale": scale, "mass_um3": mass}


def _map(func, jobs, num_workers, desc):
    if num_workers > 1:
        with multiprocessing.get_context("fork").Pool(num_workers) as pool:
            return list(tqdm(pool.imap(func, jobs), total=len(jobs), desc=desc, unit="cloud", disable=None))
    return [func(job) for job in tqdm(jobs, desc=desc, unit="cloud", disable=None)]


def _check_output_dir(output_dir, overwrite):
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"{output_dir}: exists and is not a folder")
    existing = [name for name in OUTPUTS if (output_dir / name).exists()]
    if existing and not overwrite:
        raise UserError(f"{output_dir}: already holds a conversion ({', '.join(existing)}); pass --overwrite")


def _move_into_place(tmp, output_dir):
    """Replace only the converter's own entries in ``output_dir``; anything else there is left alone."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        target = output_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        if (tmp / name).exists():
            os.replace(tmp / name, target)


def convert(
    h5_file=None,
    output_dir="data/voxels_nifti",
    voxel_size=64,
    method="gaussian",
    sigma=1.0,
    sigma_unit="voxel",
    train_ratio=0.8,
    data_key=None,
    volume_dims=None,
    padding=0.0,
    no_compression=False,
    seed=42,
    num_workers=1,
    normalize="max",
    percentile=99.9,
    tiles=None,
    tile_size=(8000.0, 8000.0, 300.0),
    unit="nm",
    pixel_size=None,
    zero_is_padding=False,
    strict=False,
    overwrite=False,
    input=None,
):
    """Voxelize every cloud of ``h5_file`` into one common box and write a train/val split of NIfTI grids.

    Args:
        h5_file: input point clouds (any format :func:`scripts.pointcloud_io.read_point_clouds` reads);
            ``input`` is an alias.
        output_dir: output folder; refused if it already holds a conversion, unless ``overwrite``.
        voxel_size: grid shape, an int or [X, Y, Z].
        method: 'gaussian', 'density' or 'occupancy'.
        sigma: Gaussian width, a number or [X, Y, Z], in ``sigma_unit`` ('voxel' or 'nm').
        train_ratio: fraction of clouds for training; the rest is validation.
        data_key: HDF5 key of the clouds (auto-detected when not given).
        volume_dims: box size in nm ([X, Y, Z] or a number), centred on the data; default: the data's extent.
        padding: margin in nm added to the box on each side.
        no_compression: write ``.nii`` instead of ``.nii.gz``.
        seed: seed of the split (and of the tiles).
        num_workers: processes that voxelize and write in parallel.
        normalize: 'max' (per volume), 'percentile' (dataset-wide ``percentile`` of non-zero voxels) or 'none'.
        tiles: cut this many random boxes of ``tile_size`` nm (rotated about z, re-origined) out of the input.
        unit, pixel_size, zero_is_padding, strict: passed to the reader (unit of bare coordinates, camera pixel
            size in nm, whether (0, 0, 0) rows are padding, whether NaN/Inf coordinates are refused).
        overwrite: replace an earlier conversion in ``output_dir`` (only its own files).
    """
    source = h5_file if h5_file is not None else input
    if source is None:
        raise UserError("--h5_file: give the input point-cloud file")
    shape = as_shape(voxel_size)
    output_dir = Path(output_dir)
    if not 0 < float(train_ratio) <= 1:
        raise UserError(f"train_ratio: must be in (0, 1], got {train_ratio!r}")
    if not isinstance(num_workers, int) or num_workers < 1:
        raise UserError(f"num_workers: must be a positive integer, got {num_workers!r}")
    _check_output_dir(output_dir, overwrite)

    clouds, meta = read_point_clouds(source, data_key, unit, pixel_size, zero_is_padding, strict)
    tile_info = None
    if tiles:
        clouds, tile_sources = cut_tiles(clouds, int(tiles), tile_size, seed)
        tile_info = {"n_tiles": int(tiles), "tile_size_nm": list(as_triple(tile_size, "tile_size")), "seed": seed}
        corners = np.array([[0.0, 0.0, 0.0], tile_info["tile_size_nm"]])
        geometry = GridGeometry.around(corners, shape, padding, volume_dims)
    else:
        tile_sources = list(range(len(clouds)))
        geometry = GridGeometry.around(clouds, shape, padding, volume_dims)
    sigma_voxels = sigma_in_voxels(sigma, sigma_unit, geometry) if method == "gaussian" else np.zeros(3)

    order = np.random.default_rng(seed).permutation(len(clouds))
    n_train = max(1, int(round(len(clouds) * float(train_ratio))))
    splits = {"train": sorted(order[:n_train].tolist()), "val": sorted(order[n_train:].tolist())}
    width = max(4, len(str(len(clouds) - 1)))
    suffix = ".nii" if no_compression else ".nii.gz"

    constant = None
    if normalize == "percentile":
        jobs = [(clouds[i], geometry, method, sigma_voxels, seed + i) for i in splits["train"]]
        constant = float(
            np.percentile(np.concatenate(_map(_percentile_sample, jobs, num_workers, "percentile")), percentile)
        )

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.convert-", dir=output_dir.parent))
    try:
        jobs = []
        for split, members in splits.items():
            (tmp / split).mkdir()
            jobs += [
                (
                    clouds[i],
                    tmp / split / f"{split}_{i:0{width}d}{suffix}",
                    geometry,
                    method,
                    sigma_voxels,
                    normalize,
                    constant,
                )
                for i in members
            ]
        results = _map(_convert_one, jobs, num_workers, "convert")
        empty = [r["name"] for r in results if r["points"] == 0]
        if empty:
            raise UserError(f"{source}: no points inside the box for {', '.join(empty[:5])}")
        records = {"train": results[: len(splits["train"])], "val": results[len(splits["train"]) :]}
        for split, members in splits.items():
            if members:
                write_point_clouds_h5(tmp / f"{split}_points.h5", [clouds[i] for i in members], members)
        ppm = np.array([r["points"] / r["mass_um3"] for r in records["train"] if r["mass_um3"] > 0])
        info = {
            "format_version": 1,
            "source": {"file": str(Path(source).resolve()), **{k: v for k, v in meta.items() if k != "source"}},
            "geometry": geometry.to_dict(),
            "voxelization": {
                "method": method,
                "sigma_voxels": [float(v) for v in sigma_voxels],
                "sigma_nm": [float(v) for v in sigma_voxels * geometry.spacing_nm],
                "truncate_sigmas": 4.0,
            },
            "normalization": {
                "rule": normalize,
                "percentile": percentile if normalize == "percentile" else None,
                "constant": constant,
            },
            "split": {"train_ratio": float(train_ratio), "seed": seed, "train": splits["train"], "val": splits["val"]},
            "tiles": tile_info,
            "counts": {
                "n_train": len(splits["train"]),
                "n_val": len(splits["val"]),
                "points_inside": int(sum(r["points"] for rs in records.values() for r in rs)),
                "points_outside_box": int(sum(r["outside"] for rs in records.values() for r in rs)),
            },
            "points_per_mass": {
                "mean": float(ppm.mean()),
                "std": float(ppm.std()),
                "unit": "points per (intensity * um^3)",
            },
            "files": {
                split: [dict(r, source_index=int(tile_sources[i])) for r, i in zip(records[split], splits[split])]
                for split in splits
            },
        }
        (tmp / "dataset_info.json").write_text(json.dumps(info, indent=4) + "\n")
        _move_into_place(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts = info["counts"]
    print(
        f"wrote {counts['n_train']} train and {counts['n_val']} val grids of {list(shape)} voxels "
        f"({', '.join(f'{s:.1f}' for s in geometry.spacing_nm)} nm) to {output_dir}; "
        f"{counts['points_outside_box']} points outside the box were dropped"
    )
    return info


if __name__ == "__main__":
    fire.Fire(exit_on_user_error(convert))
