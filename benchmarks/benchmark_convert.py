"""Benchmark ``scripts/convert_h5_to_nifti.py`` against a plain dense reference pipeline.

Run from the bundle root::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/benchmark_convert.py [--quick]

The reference is what a prototype would do per cloud: ``np.histogramdd`` over the same box, ``scipy.ndimage.
gaussian_filter`` (constant mode, truncate 4), divide by the maximum, ``astype(float32)``, ``nib.save`` to
``.nii.gz``. It reads the input with the same reader as the converter. Ours is ``convert()`` end to end (reading,
voxelizing, NIfTI, points files and ``dataset_info.json``).

Cases: (1) many medium clouds, throughput with 1 and 2 workers; (2) one large cloud, time and peak memory, each
pipeline in a fresh subprocess; (3) the largest absolute difference between our grid and the reference grid.
"""

import argparse
import contextlib
import functools
import gc
import io
import json
import multiprocessing
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root: benchmarks.common and scripts

from benchmarks import common  # noqa: E402
from benchmarks.common import ROOT, SEED  # noqa: E402

# isort: split
import h5py  # noqa: E402
import isal  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import scipy  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402
from scripts.convert_h5_to_nifti import convert  # noqa: E402
from scripts.data.geometry import GridGeometry  # noqa: E402
from scripts.data.pointclouds import read_point_clouds, write_point_clouds_h5  # noqa: E402
from scripts.simulate_smlm import simulate_microtubules  # noqa: E402

BOX_NM = (20000.0, 20000.0, 1200.0)  # a 20 x 20 um field of view, 1.2 um deep: a typical 3D SMLM acquisition
SIGMA_VOXELS = 1.0
TRUNCATE = 4.0
TRAIN_RATIO = 0.8

FULL = {
    "n_clouds": 32,
    "points": 50_000,
    "shape": (256, 256, 64),
    "big_points": 500_000,
    "big_shape": (1024, 1024, 128),
}
QUICK = {"n_clouds": 4, "points": 5_000, "shape": (64, 64, 32), "big_points": 50_000, "big_shape": (128, 128, 32)}


# ----------------------------------------------------------------------------------------------------------------
# The two pipelines
# ----------------------------------------------------------------------------------------------------------------


def split_indices(n_clouds, train_ratio, seed):
    """The converter's train/val split, so the reference writes the same files under the same names."""
    order = np.random.default_rng(seed).permutation(n_clouds)
    n_train = max(1, int(round(n_clouds * float(train_ratio))))
    return {"train": sorted(order[:n_train].tolist()), "val": sorted(order[n_train:].tolist())}


def reference_convert(h5_file, output_dir, shape, sigma=SIGMA_VOXELS, train_ratio=TRAIN_RATIO, seed=SEED):
    """Plain dense pipeline: histogramdd -> gaussian_filter -> / max -> float32 -> nib.save(.nii.gz)."""
    clouds, _ = read_point_clouds(h5_file)
    geometry = GridGeometry.around(clouds, shape)
    ranges = list(zip(geometry.box_min_nm, geometry.box_max_nm))
    affine = geometry.affine()
    width = max(4, len(str(len(clouds) - 1)))
    for split, members in split_indices(len(clouds), train_ratio, seed).items():
        folder = Path(output_dir) / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in members:
            hist, _ = np.histogramdd(clouds[i], bins=shape, range=ranges)
            vol = gaussian_filter(hist, sigma=sigma, mode="constant", truncate=TRUNCATE)
            vol = (vol / vol.max()).astype(np.float32)
            nib.save(nib.Nifti1Image(vol, affine), str(folder / f"{split}_{i:0{width}d}.nii.gz"))


def ours_convert(h5_file, output_dir, shape, num_workers=1, train_ratio=TRAIN_RATIO):
    """The bundle's converter end to end; its summary line is swallowed to keep the output a table."""
    with contextlib.redirect_stdout(io.StringIO()):
        convert(
            h5_file=str(h5_file),
            output_dir=str(output_dir),
            voxel_size=list(shape),
            method="gaussian",
            sigma=SIGMA_VOXELS,
            num_workers=num_workers,
            train_ratio=train_ratio,
            seed=SEED,
        )


def run_pipeline(which, h5_file, output_dir, shape, num_workers=1, train_ratio=TRAIN_RATIO):
    if which == "reference":
        reference_convert(h5_file, output_dir, shape, train_ratio=train_ratio)
    else:
        ours_convert(h5_file, output_dir, shape, num_workers=num_workers, train_ratio=train_ratio)


def _probe_kernel(n_grids, shape):
    grid = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(n_grids):
        gaussian_filter(grid, SIGMA_VOXELS, mode="constant", truncate=TRUNCATE, output=grid)


def two_process_scaling(n_grids, shape):
    """Speed-up of 2 forked processes over 1 on a pure CPU kernel (the blur, no I/O): what the machine gives now."""
    one, _ = common.timed(_probe_kernel, n_grids, shape)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        two, _ = common.timed(
            pool.map, functools.partial(_probe_kernel, shape=shape), [n_grids // 2, n_grids - n_grids // 2]
        )
    return one / two


# ----------------------------------------------------------------------------------------------------------------
# Peak memory, measured in a fresh interpreter per pipeline
# ----------------------------------------------------------------------------------------------------------------


def _status_kib(field):
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1)) if match else None


def _reset_peak_rss():
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0); False where that is unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_main(which, h5_file, output_dir, shape):
    """Run one pipeline once in this (fresh) process; print its time and peak-memory increase as JSON."""
    clouds, _ = read_point_clouds(h5_file)  # warm-up read: page cache, h5py and numpy internals all loaded
    del clouds
    gc.collect()
    reset = _reset_peak_rss()
    baseline_kib = _status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    seconds, _ = common.timed(run_pipeline, which, h5_file, output_dir, shape, num_workers=1, train_ratio=1.0)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    increase = (peak_kib - baseline_kib) * 1024
    fields = dict(seconds=seconds, baseline_kib=baseline_kib, peak_kib=peak_kib, increase_bytes=increase)
    print(json.dumps(dict(fields, peak_was_reset=reset)))


def run_child(which, h5_file, output_dir, shape):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", which, str(h5_file), str(output_dir)]
    cmd += [str(v) for v in shape]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"child {which} failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def print_report(cfg, quick, load, case1, case2, case3):
    n, shape = cfg["n_clouds"], cfg["shape"]
    ref, o1, o2 = (min(case1[k]) for k in ("reference", "ours1", "ours2"))
    grid_bytes = int(np.prod(cfg["big_shape"])) * 4
    c1 = f"1: {n} × {cfg['points']:,} pts → {common.fmt_shape(shape)}"
    c2 = f"2: 1 × {cfg['big_points']:,} pts → {common.fmt_shape(cfg['big_shape'])}"
    note = f"box {list(BOX_NM)} nm; sigma {SIGMA_VOXELS} voxel, truncate {TRUNCATE}; per-volume max normalisation; "
    note += ".nii.gz output"
    modules = (np, scipy, nib, h5py, isal)
    lines = common.machine_header("Converter benchmark", quick, load, modules, note, method="Conversion")
    lines += [
        "| Case | Pipeline | Workers | Seconds | Clouds/s | Speed-up | Peak memory increase | × float32 grid |",
        "|---|---|---:|---:|---:|---|---:|---:|",
        f"| {c1} | reference | 1 | {ref:.2f} | {n / ref:.2f} | 1.00× (baseline) | – | – |",
        f"| {c1} | ours | 1 | {o1:.2f} | {n / o1:.2f} | **{ref / o1:.2f}×** ours(1)/reference | – | – |",
        f"| {c1} | ours | 2 | {o2:.2f} | {n / o2:.2f} | **{o1 / o2:.2f}×** ours(2)/ours(1); "
        f"{ref / o2:.2f}× vs reference | – | – |",
    ]
    for key in ("reference", "ours"):
        r = case2[key]
        speed = "1.00× (baseline)" if key == "reference" else f"**{case2['reference']['seconds'] / r['seconds']:.2f}×**"
        lines.append(
            f"| {c2} | {key} | 1 | {r['seconds']:.2f} | {1 / r['seconds']:.3f} | {speed} | "
            f"{common.mib(r['increase_bytes'])} | {r['increase_bytes'] / grid_bytes:.2f}× |"
        )
    verdict = "OK" if case3["max_abs_diff"] <= 1e-3 else "ABOVE TARGET"
    lines += [
        f"| 3: values, cloud {case3['index']} of case 1 | max \\|ours − reference\\| | – | – | – | "
        f"{case3['max_abs_diff']:.2e} ({verdict}, target ≤ 1e-3; affines equal: {case3['affine_equal']}) | – | – |",
        "",
        f"- Case 1, all runs (s): reference {common.fmt_runs(case1['reference'], 2)}, ours(1) "
        f"{common.fmt_runs(case1['ours1'], 2)}, ours(2) {common.fmt_runs(case1['ours2'], 2)}.",
        f"- Case 2: peak reset by `/proc/self/clear_refs`: reference {case2['reference']['peak_was_reset']}, ours "
        f"{case2['ours']['peak_was_reset']}; one float32 grid of {common.fmt_shape(cfg['big_shape'])} = "
        f"{common.mib(grid_bytes)}.",
        f"- Two processes against one on the blur alone ({common.fmt_shape(shape)}): {case1['probe_before']:.2f}× "
        f"before case 1, {case1['probe_after']:.2f}× after.",
    ]
    print("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def make_input(path, n_clouds, points):
    clouds = simulate_microtubules(
        n_clouds, seed=SEED, mean_points=points, points_spread=0.0, box_min_nm=(0.0, 0.0, 0.0), box_size_nm=BOX_NM
    )
    write_point_clouds_h5(path, clouds)
    return path


def find_volume(folder, index):
    matches = sorted(Path(folder).glob(f"*/*_{index:04d}.nii.gz"))
    if len(matches) != 1:
        raise RuntimeError(f"{folder}: expected one volume for cloud {index}, found {matches}")
    return matches[0]


def compare_values(ours_dir, reference_dir, index):
    ours_img, ref_img = nib.load(str(find_volume(ours_dir, index))), nib.load(str(find_volume(reference_dir, index)))
    ours, ref = ours_img.get_fdata(dtype=np.float32), ref_img.get_fdata(dtype=np.float32)
    if ours.shape != ref.shape:
        raise RuntimeError(f"shape mismatch: ours {ours.shape}, reference {ref.shape}")
    return {
        "index": index,
        "max_abs_diff": float(np.max(np.abs(ours - ref))),
        "affine_equal": bool(np.allclose(ours_img.affine, ref_img.affine, rtol=0, atol=1e-9)),
    }


def main(argv=None):
    parser = common.arg_parser(__doc__, "tiny sizes: a smoke check that runs in seconds", "inputs and outputs")
    parser.add_argument("--repeat", type=int, default=3, help="runs per pipeline in case 1; the best counts")
    parser.add_argument("--child", nargs=6, metavar=("WHICH", "H5", "OUT", "X", "Y", "Z"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        which, h5_file, output_dir, *shape = args.child
        child_main(which, h5_file, output_dir, tuple(int(v) for v in shape))
        return

    cfg = QUICK if args.quick else FULL
    load = common.load_average()
    probe_grids = 4 if args.quick else 16
    with common.work_folder(__file__, args.tmpdir) as work:
        print(f"simulating inputs in {work} ...", file=sys.stderr)
        small = make_input(work / "case1.h5", cfg["n_clouds"], cfg["points"])
        big = make_input(work / "case2.h5", 1, cfg["big_points"])

        print("case 1 ...", file=sys.stderr)
        case1 = {"reference": [], "ours1": [], "ours2": []}
        case1["probe_before"] = two_process_scaling(probe_grids, cfg["shape"])
        for _ in range(max(1, args.repeat)):
            for key, which, workers in (("reference", "reference", 1), ("ours1", "ours", 1), ("ours2", "ours", 2)):
                out = work / f"c1_{key}"
                shutil.rmtree(out, ignore_errors=True)  # keep the last run's output of reference and ours(1)
                case1[key].append(common.timed(run_pipeline, which, small, out, cfg["shape"], num_workers=workers)[0])
        case1["probe_after"] = two_process_scaling(probe_grids, cfg["shape"])
        shutil.rmtree(work / "c1_ours2", ignore_errors=True)

        print("case 3 ...", file=sys.stderr)
        first_train = split_indices(cfg["n_clouds"], TRAIN_RATIO, SEED)["train"][0]
        case3 = compare_values(work / "c1_ours1", work / "c1_reference", first_train)
        shutil.rmtree(work / "c1_ours1", ignore_errors=True)
        shutil.rmtree(work / "c1_reference", ignore_errors=True)

        print("case 2 ...", file=sys.stderr)
        case2 = {}
        for which in ("reference", "ours"):
            case2[which] = run_child(which, big, work / f"c2_{which}", cfg["big_shape"])
            shutil.rmtree(work / f"c2_{which}", ignore_errors=True)
    print_report(cfg, args.quick, load, case1, case2, case3)


if __name__ == "__main__":
    main()
