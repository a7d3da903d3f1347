"""The packages the bundle imports, some only through MONAI's ``optional_import`` (which fails late, mid-run, with
a traceback when one is missing): checked at start-up so a missing one is one line."""

import importlib.metadata
import importlib.util
import re

from scripts.runtime.errors import UserError

MONAI_MINIMUM = (1, 5)  # RFlowScheduler, the default stage-2 objective

# module -> (pip name, what needs it)
PACKAGES = {
    "monai": ("monai", "the whole bundle"),
    "ignite": ("pytorch-ignite", "MONAI's trainers and evaluators"),
    "einops": ("einops", "the attention blocks of MONAI's AutoencoderKL and DiffusionModelUNet"),
    "nibabel": ("nibabel", "reading and writing NIfTI volumes"),
    "tensorboard": ("tensorboard", "the TensorBoard logs"),
    "tqdm": ("tqdm", "progress bars"),
    "h5py": ("h5py", "HDF5 point clouds"),
    "scipy": ("scipy", "voxelization and the metrics"),
    "isal": ("isal", "writing .nii.gz"),
    "matplotlib": ("matplotlib", "previews and figures"),
    "fire": ("fire", "the command lines"),
    "yaml": ("pyyaml", "large_files.yml and YAML configs"),
    "jsonschema": ("jsonschema", "python -m monai.bundle verify_metadata"),
}


def missing_packages(modules=PACKAGES):
    """The modules of ``modules`` that cannot be imported here."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def check_dependencies(modules=PACKAGES):
    """Refuse to start when a needed package is missing, naming it, what needs it and how to install it."""
    missing = missing_packages(modules)
    if missing:
        names = ", ".join(f"{modules[m][0]} (for {modules[m][1]})" for m in missing)
        raise UserError(f"requirements: {names} not installed; pip install -r requirements.txt (from the bundle root)")
    if "monai" in modules:
        version = importlib.metadata.version("monai")
        if tuple(int(v) for v in re.findall(r"\d+", version)[:2]) < MONAI_MINIMUM:
            raise UserError(
                f"requirements: monai {version} is installed, but the bundle needs monai >= "
                f"{'.'.join(map(str, MONAI_MINIMUM))} (RFlowScheduler); pip install -r requirements.txt"
            )
