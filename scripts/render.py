"""Render a point cloud as an SMLM image (x/y histogram, Gaussian blur, coloured by z, scale bar)::

    python scripts/render.py --input outputs/samples/pointcloud/sample_0000.csv --output sample_0000.png
    python scripts/render.py --input outputs/samples/pointcloud/sample_0000.csv --output side.png --view xz  # from the side

The renderer is :mod:`scripts.evaluation.rendering`.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.evaluation.rendering import main as render  # noqa: E402
from scripts.runtime.command_line import main  # noqa: E402

if __name__ == "__main__":
    main(render)
