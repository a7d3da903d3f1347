"""The built-in demo: simulate SMLM microtubules and convert them to training grids.

Usage from the bundle root::

    python scripts/run_demo.py [--demo_dir data/demo] [--n_clouds 64] [--voxel_size 32]

Writes ``<demo_dir>/microtubules.h5`` and ``<demo_dir>/voxels_nifti/`` (the demo's own folder; re-running the
demo replaces the demo's files there and nothing else).
"""

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402

from scripts.convert_h5_to_nifti import convert  # noqa: E402
from scripts.errors import exit_on_user_error  # noqa: E402
from scripts.pointcloud_io import write_point_clouds_h5  # noqa: E402
from scripts.simulate_smlm import simulate_microtubules  # noqa: E402


def run_demo(demo_dir="data/demo", n_clouds=64, voxel_size=32, mean_points=10000, seed=0):
    """Simulate ``n_clouds`` microtubule clouds and convert them to ``voxel_size`` grids (gaussian, σ = 1 voxel)."""
    start = time.perf_counter()
    demo_dir = Path(demo_dir)
    points = write_point_clouds_h5(
        demo_dir / "microtubules.h5", simulate_microtubules(n_clouds, seed, mean_points=mean_points)
    )
    print(f"simulated {n_clouds} clouds -> {points}")
    convert(
        points,
        demo_dir / "voxels_nifti",
        voxel_size=voxel_size,
        method="gaussian",
        sigma=1.0,
        seed=seed,
        overwrite=True,
    )
    print(f"demo finished in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    fire.Fire(exit_on_user_error(run_demo))
