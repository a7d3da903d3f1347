"""Convert point clouds to NIfTI grids for training, with their geometry in ``dataset_info.json``.

Usage from the bundle root::

    python scripts/convert_h5_to_nifti.py --h5_file F --output_dir D --voxel_size 64 --method gaussian --sigma 1.0

Writes ``D/train/*.nii.gz``, ``D/val/*.nii.gz``, ``D/train_points.h5``, ``D/val_points.h5`` and
``D/dataset_info.json``. Everything is written to a staging folder inside ``D`` first and swapped in when complete
(:mod:`scripts.runtime.output_folders`), so a failure, a kill or Ctrl-C leaves an earlier conversion in ``D`` whole.
"""

import json
import multiprocessing
import shutil
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from scripts.data.geometry import GridGeometry, as_shape, as_triple  # noqa: E402
from scripts.data.nifti import save_nifti  # noqa: E402
from scripts.data.pointclouds import read_point_clouds, write_point_clouds_h5  # noqa: E402
from scripts.data.tiles import check_tile_size, cut_tiles, suggest_tiles  # noqa: E402
from scripts.data.voxelize import dataset_percentile, grid_mass_um3, normalize_, sigma_in_voxels, voxelize  # noqa: E402
from scripts.runtime.command_line import main  # noqa: E402
from scripts.runtime.errors import UserError  # noqa: E402
from scripts.runtime.output_folders import StagedOutput  # noqa: E402
from scripts.runtime.progress import progress  # noqa: E402
from scripts.runtime.resources import check_memory  # noqa: E402
from scripts.runtime.settings import NORMALIZATIONS, SPLATS, VOXELIZATIONS  # noqa: E402

# the converter's own files (an earlier conversion without a manifest is recognised by them)
OUTPUT_PATTERNS = (
    "train/train_*.nii",
    "train/train_*.nii.gz",
    "val/val_*.nii",
    "val/val_*.nii.gz",
    "train_points.h5",
    "val_points.h5",
    "dataset_info.json",
)
NO_Z_HINT = "this bundle makes 3D grids. Pass --allow_2d true to convert them with z = 0 in a 1-nm-deep box"
PERCENTILE_SAMPLES = 100_000  # non-zero voxel values drawn per grid to estimate a dataset-wide percentile


def _grid(cloud, geometry, method, sigma_voxels, splat):
    grid, n_outside = voxelize(cloud, geometry, method, sigma_voxels, splat)
    return grid, len(cloud) - n_outside, n_outside


def _percentile_sample(job):
    cloud, geometry, method, sigma_voxels, splat, seed = job
    grid = _grid(cloud, geometry, method, sigma_voxels, splat)[0]
    values = grid[grid > 0]
    return np.random.default_rng(seed).choice(values, min(len(values), PERCENTILE_SAMPLES), replace=False)


def _convert_one(job):
    cloud, path, geometry, method, sigma_voxels, splat, rule, constant = job
    grid, n_inside, n_outside = _grid(cloud, geometry, method, sigma_voxels, splat)
    scale = normalize_(grid, rule, constant)
    save_nifti(path, grid, geometry)
    mass = grid_mass_um3(grid, geometry)
    return {"name": path.name, "points": n_inside, "outside": n_outside, "scale": scale, "mass_um3": mass}


def _worker_signals():
    """Pool workers die quietly on the SIGTERM with which the pool ends them (the parent owns the staging folder
    and unwinds on its own signals)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _map(func, jobs, num_workers, desc):
    if num_workers > 1:
        with multiprocessing.get_context("fork").Pool(num_workers, initializer=_worker_signals) as pool:
            return list(progress(pool.imap(func, jobs), desc, "cloud", total=len(jobs)))
    return [func(job) for job in progress(jobs, desc, "cloud")]


def _outliers(points, geometry):
    """``(n, axis)`` when the box is more than 10× the extent of 99.8 % of the points along an axis, else ``None``."""
    lo, hi = np.percentile(points, 0.1, axis=0), np.percentile(points, 99.9, axis=0)
    core = np.maximum(hi - lo, 1e-9)
    for axis in np.flatnonzero(geometry.size_nm > 10 * core):
        if hi[axis] - lo[axis] > 0:
            margin = (hi[axis] - lo[axis]) / 2
            far = (points[:, axis] < lo[axis] - margin) | (points[:, axis] > hi[axis] + margin)
            return int(far.sum()), int(axis), lo[axis], hi[axis]
    return None


def _remove_legacy_staging(output_dir):
    """Staging folders that earlier versions of the converter left beside ``output_dir`` when killed."""
    for stale in output_dir.parent.glob(f".{output_dir.name}.convert-*"):
        print(f"warning: removing {stale}, left by a conversion that was stopped", file=sys.stderr)
        shutil.rmtree(stale, ignore_errors=True)


def _check_arguments(shape, method, splat, normalize, sigma, sigma_unit, train_ratio, num_workers, tiles, percentile):
    """Refuse bad settings with one line before anything is read."""
    if method not in VOXELIZATIONS:
        raise UserError(f"method: expected one of {', '.join(VOXELIZATIONS)}, got {method!r}")
    if splat not in SPLATS:
        raise UserError(f"splat: expected one of {', '.join(SPLATS)}, got {splat!r}")
    if normalize not in NORMALIZATIONS:
        raise UserError(f"normalize: expected one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    if method == "gaussian":
        sigma_in_voxels(sigma, sigma_unit, GridGeometry((0, 0, 0), (1, 1, 1), shape))  # positive, known unit
    if not isinstance(train_ratio, (int, float)) or isinstance(train_ratio, bool) or not 0 < train_ratio <= 1:
        raise UserError(f"train_ratio: must be in (0, 1], got {train_ratio!r}")
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        raise UserError(f"num_workers: must be a positive integer, got {num_workers!r}")
    if tiles is not None and (not isinstance(tiles, int) or isinstance(tiles, bool) or tiles < 1):
        raise UserError(f"tiles: must be a positive integer, got {tiles!r}")
    if not 0 < percentile <= 100:
        raise UserError(f"percentile: must be in (0, 100], got {percentile!r}")
    check_memory(
        2 * 4 * int(np.prod(shape, dtype=np.float64)) * num_workers,
        f"voxel_size: {list(shape)}",
        "use a smaller voxel_size (or fewer --num_workers)",
    )


def _read_clouds(source, data_key, unit, pixel_size, zero_is_padding, strict, allow_2d):
    """The input's clouds and metadata; 2D data are refused unless ``allow_2d``, and so is a cloud whose points all
    lie at one position (it has no extent to make a grid of)."""
    clouds, meta = read_point_clouds(source, data_key, unit, pixel_size, zero_is_padding, strict)
    if meta["dims"] == 2 and not allow_2d:
        raise UserError(f"{source}: the points have no z (2D data); {NO_Z_HINT}")
    for i, cloud in enumerate(clouds):
        if len(cloud) == 1 or not np.ptp(cloud, axis=0).any():
            n = "a single point" if len(cloud) == 1 else f"{len(cloud)} points, all at one position (1 distinct point)"
            raise UserError(
                f"{source}: cloud {i} has {n}; a grid needs at least 2 distinct points per cloud (remove the cloud, "
                "or check how the file was written)"
            )
    flat_z = meta["dims"] == 2 or np.ptp(np.concatenate([c[:, 2] for c in clouds])) == 0
    if flat_z and not allow_2d:
        z = clouds[0][0, 2]
        raise UserError(f"{source}: the points have no z (2D data: every z is {z:g} nm); {NO_Z_HINT}")
    if flat_z:
        print("note: 2D data: z = 0 for every point, the box is 1 nm deep (--allow_2d)", file=sys.stderr)
    if meta["nonfinite_dropped"]:
        print(
            f"warning: {source}: dropped {meta['nonfinite_dropped']} points with NaN/Inf coordinates in "
            f"{meta['nonfinite_clouds']} of {len(clouds)} clouds (--strict true refuses them)",
            file=sys.stderr,
        )
    return clouds, meta


def _box(source, clouds, shape, tiles, tile_size, seed, padding, volume_dims, box_anchor, train_ratio):
    """The clouds (cut into tiles when asked), the source index of each, the tiling and the common grid geometry."""
    tile_info = None
    if tiles and train_ratio < 1:
        check_tile_size(source, clouds, tile_size)
    if tiles:
        clouds, tile_sources = cut_tiles(clouds, int(tiles), tile_size, seed)
        tile_info = {"n_tiles": int(tiles), "tile_size_nm": list(as_triple(tile_size, "tile_size")), "seed": seed}
        corners = np.array([[0.0, 0.0, 0.0], tile_info["tile_size_nm"]])
        geometry = GridGeometry.around(corners, shape, padding, volume_dims, box_anchor)
    else:
        tile_sources = list(range(len(clouds)))
        geometry = GridGeometry.around(clouds, shape, padding, volume_dims, box_anchor)
        far = _outliers(np.concatenate(clouds), geometry) if volume_dims is None else None
        if far:
            n, axis, lo, hi = far
            print(
                f"warning: {source}: {n} points lie far outside the others along {'xyz'[axis]} (99.8 % are within "
                f"{lo:.0f}–{hi:.0f} nm), so the box is {geometry.size_nm[axis]:.3g} nm wide and voxels "
                f"{geometry.spacing_nm[axis]:.3g} nm; pass --volume_dims (and --padding) to set the box",
                file=sys.stderr,
            )
    return clouds, tile_sources, tile_info, geometry


def _split(source, clouds, geometry, train_ratio, seed, strict):
    """The seeded train/val split of the clouds with points in the box, and the indices of those without."""
    inside = np.array([int(geometry.inside(c).sum()) for c in clouds])
    skipped = [int(i) for i in np.flatnonzero(inside == 0)]
    if len(skipped) == len(clouds):
        raise UserError(f"{source}: no points inside the box for any of the {len(clouds)} clouds")
    if skipped and strict:
        raise UserError(f"{source}: no points inside the box for {len(skipped)} clouds ({skipped[:5]}; --strict)")
    if skipped:
        print(
            f"warning: {len(skipped)} of {len(clouds)} clouds have no point inside the box and are skipped",
            file=sys.stderr,
        )
    usable = [i for i in range(len(clouds)) if inside[i] > 0]
    order = np.random.default_rng(seed).permutation(usable)
    n_train = int(round(len(usable) * float(train_ratio)))
    n_train = len(usable) if train_ratio == 1 else max(1, min(n_train, len(usable) - 1))
    if n_train == len(usable) and train_ratio < 1:
        n_tiles, size = suggest_tiles(clouds)
        raise UserError(
            f"{source}: holds {len(usable)} usable cloud, so the split has no validation grid and stage 1 cannot "
            f"validate; cut it into tiles (--tiles {n_tiles} --tile_size {[round(v) for v in size]} fits this data) "
            "or pass --train_ratio 1"
        )
    splits = {"train": sorted(order[:n_train].tolist()), "val": sorted(order[n_train:].tolist())}
    return splits, skipped


def _voxelization(method, splat, sigma_voxels, geometry):
    """How the grids were made, as ``dataset_info.json`` records it."""
    return {
        "method": method,
        "splat": splat if method != "occupancy" else "nearest",
        "sigma_voxels": [float(v) for v in sigma_voxels],
        "sigma_nm": [float(v) for v in sigma_voxels * geometry.spacing_nm],
        "truncate_sigmas": 4.0,
    }


def _dataset_info(source, meta, geometry, recipe, splits, skipped, records, clouds, tile_sources):
    """``dataset_info.json``: how the grids were made (``recipe``: the box, voxelization, normalization, split and
    tiles entries), the counts, the points per unit of grid mass and each file's record."""
    points = np.array([r["points"] for r in records["train"] if r["mass_um3"] > 0], np.float64)
    masses = np.array([r["mass_um3"] for r in records["train"] if r["mass_um3"] > 0], np.float64)
    return {
        "format_version": 1,
        "source": {"file": str(Path(source).resolve()), **{k: v for k, v in meta.items() if k != "source"}},
        "geometry": geometry.to_dict(),
        **recipe,
        "skipped_no_points_in_box": skipped,
        "counts": {
            "n_train": len(splits["train"]),
            "n_val": len(splits["val"]),
            "n_skipped": len(skipped),
            "points_inside": int(sum(r["points"] for rs in records.values() for r in rs)),
            "points_outside_box": int(sum(r["outside"] for rs in records.values() for r in rs))
            + int(sum(len(clouds[i]) for i in skipped)),
        },
        # the training set's points per unit of grid mass (its total points over its total mass: per-cloud
        # ratios vary with each grid's maximum, and their mean overestimates counts, by 11 % on the demo data)
        "points_per_mass": {
            "mean": float(points.sum() / masses.sum()),
            "std_per_cloud": float(np.std(points / masses)),
            "unit": "points per (intensity * um^3)",
        },
        "files": {
            split: [dict(r, source_index=int(tile_sources[i])) for r, i in zip(records[split], splits[split])]
            for split in splits
        },
    }


def convert(
    h5_file=None,
    output_dir="data/voxels_nifti",
    voxel_size=64,
    method="gaussian",
    sigma=1.0,
    sigma_unit="voxel",
    splat="trilinear",
    train_ratio=0.8,
    data_key=None,
    volume_dims=None,
    padding=0.0,
    box_anchor="zero",
    no_compression=False,
    seed=42,
    num_workers=1,
    normalize="max",
    percentile=99.9,
    tiles=None,
    tile_size=(8000.0, 8000.0, 300.0),
    unit=None,
    pixel_size=None,
    zero_is_padding=False,
    strict=False,
    allow_2d=False,
    overwrite=False,
    input=None,
):
    """Voxelize every cloud of ``h5_file`` into one common box and write a train/val split of NIfTI grids.

    Args:
        h5_file: input point clouds (any format :func:`scripts.data.pointclouds.read_point_clouds` reads);
            ``input`` is an alias.
        output_dir: output folder; refused if it already holds a conversion, unless ``overwrite``.
        voxel_size: grid shape, an int or [X, Y, Z].
        method: 'gaussian', 'density' or 'occupancy'.
        sigma: Gaussian width, a number or [X, Y, Z], in ``sigma_unit`` ('voxel' or 'nm').
        splat: 'trilinear' (each point shared among its 8 nearest voxel centres, so grids keep sub-voxel positions:
            what the fine stage reads) or 'nearest' (each point in its voxel); see :func:`scripts.data.voxelize.voxelize`.
        train_ratio: fraction of clouds for training; the rest is validation (at least one cloud when below 1).
        data_key: HDF5 key of the clouds (auto-detected when not given).
        volume_dims: box size in nm ([X, Y, Z] or a number); the box is ``[-padding, volume_dims + padding]`` per
            axis, as in the seed (``box_anchor='center'``: centred on the data instead). Default: the data's extent.
        padding: margin in nm added to the box on each side.
        box_anchor: 'zero' (default) or 'center', see ``volume_dims``.
        no_compression: write ``.nii`` instead of ``.nii.gz``.
        seed: seed of the split (and of the tiles).
        num_workers: processes that voxelize and write in parallel.
        normalize: 'max' (per volume), 'percentile' (dataset-wide ``percentile`` of non-zero voxels) or 'none'.
        tiles: cut this many random boxes of ``tile_size`` nm (rotated about z, re-origined) out of the input; tiles
            covering half or more of a cloud's lateral extent are refused when split (``train_ratio`` below 1).
        unit, pixel_size, zero_is_padding: passed to the reader (unit of bare coordinates, default the file's
            ``unit`` attribute or nm; camera pixel size in nm; whether (0, 0, 0) rows are padding).
        strict: refuse NaN/Inf coordinates and clouds with no point in the box instead of dropping and counting them.
        allow_2d: accept data without z (z is set to 0 and the box is 1 nm deep); refused otherwise.
        overwrite: replace an earlier conversion in ``output_dir`` (only its own files).
    """
    source = h5_file if h5_file is not None else input
    if source is None:
        raise UserError("--h5_file: give the input point-cloud file")
    shape, output_dir = as_shape(voxel_size), Path(output_dir)
    _check_arguments(shape, method, splat, normalize, sigma, sigma_unit, train_ratio, num_workers, tiles, percentile)
    staged = StagedOutput(output_dir, "a conversion", OUTPUT_PATTERNS, overwrite, "--output_dir")
    staged.check()
    _remove_legacy_staging(output_dir)

    clouds, meta = _read_clouds(source, data_key, unit, pixel_size, zero_is_padding, strict, allow_2d)
    clouds, tile_sources, tile_info, geometry = _box(
        source, clouds, shape, tiles, tile_size, seed, padding, volume_dims, box_anchor, train_ratio
    )
    sigma_voxels = sigma_in_voxels(sigma, sigma_unit, geometry) if method == "gaussian" else np.zeros(3)

    splits, skipped = _split(source, clouds, geometry, train_ratio, seed, strict)
    width = max(4, len(str(len(clouds) - 1)))
    suffix = ".nii" if no_compression else ".nii.gz"

    constant = None
    if normalize == "percentile":
        jobs = [(clouds[i], geometry, method, sigma_voxels, splat, seed + i) for i in splits["train"]]
        constant = dataset_percentile(_map(_percentile_sample, jobs, num_workers, "percentile"), percentile)

    with staged as tmp:
        jobs = []
        for split, members in splits.items():
            (tmp / split).mkdir()
            grid = (geometry, method, sigma_voxels, splat, normalize, constant)
            jobs += [(clouds[i], tmp / split / f"{split}_{i:0{width}d}{suffix}", *grid) for i in members]
        results = _map(_convert_one, jobs, num_workers, "convert")
        records = {"train": results[: len(splits["train"])], "val": results[len(splits["train"]) :]}
        for split, members in splits.items():
            if members:
                write_point_clouds_h5(tmp / f"{split}_points.h5", [clouds[i] for i in members], members)
        recipe = {
            "box": {"volume_dims_nm": volume_dims, "padding_nm": padding, "anchor": box_anchor},
            "voxelization": _voxelization(method, splat, sigma_voxels, geometry),
            "normalization": {
                "rule": normalize,
                "percentile": percentile if normalize == "percentile" else None,
                "constant": constant,
            },
            "split": {"train_ratio": float(train_ratio), "seed": seed, **splits},
            "tiles": tile_info,
        }
        info = _dataset_info(source, meta, geometry, recipe, splits, skipped, records, clouds, tile_sources)
        (tmp / "dataset_info.json").write_text(json.dumps(info, indent=4) + "\n")
    counts = info["counts"]
    print(
        f"wrote {counts['n_train']} train and {counts['n_val']} val grids of {list(shape)} voxels "
        f"({', '.join(f'{s:.1f}' for s in geometry.spacing_nm)} nm) to {output_dir}; "
        f"{counts['points_outside_box']} points outside the box were dropped"
    )
    return info


if __name__ == "__main__":
    main(convert)
