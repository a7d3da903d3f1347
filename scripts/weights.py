"""Publish trained weights in the shipped layout (what ``ckpt_export``'s defaults and the Model Zoo read)::

    python scripts/weights.py --model_dir outputs --output_dir models [--overwrite true] [--without_refiner true]
        [--eta 0] [--eta_below 0.5] [--background_from DATA]

``--eta`` (and ``--eta_below``) record the sampler these weights sample best with as their default.
``--background_from DATA`` measures the fine stage's background level on a converted data folder (its training
grids, through the autoencoder being published), for a fine stage trained before it recorded one.

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
