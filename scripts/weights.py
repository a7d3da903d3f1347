"""Publish trained weights in the shipped layout (what ``ckpt_export``'s defaults and the Model Zoo read)::

    python scripts/weights.py --model_dir outputs --output_dir models [--overwrite true] [--without_refiner true]
        [--eta 0] [--eta_below 0.5]

``--eta`` (and ``--eta_below``) record the sampler these weights sample best with as their default.

Loading and publishing live in :mod:`scripts.networks.trained`.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.networks.trained import publish  # noqa: E402
from scripts.runtime.command_line import main  # noqa: E402

if __name__ == "__main__":
    main(publish)
