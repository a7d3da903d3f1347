"""Settings a user types, parsed and validated once, at start-up, before any data is read or any output written.

Every entry point goes through here: each bundle config calls :func:`check_config` first in ``initialize``, and the
fire command lines (converter, simulator, renderer, demo) go through :func:`scripts.runtime.command_line.main`. Two things make this
necessary: through ``python -m monai.bundle run`` and fire a lowercase ``false`` arrives as the string ``'false'``,
which Python counts as true, and MONAI's CLI merges an id that no config defines without a word.
"""

import sys
from pathlib import Path

from scripts.runtime.errors import UserError
from scripts.runtime.validators import (
    choice,
    closest,
    device,
    existing_file,
    flag,
    integer,
    list_of,
    literal,
    number,
    optional_voxel_size,
    subset,
    voxel_size,
)

# Allowed values: the table below and the modules that use them read them from here.
VOXELIZATIONS = ("occupancy", "density", "gaussian")  # the converter's method
SPLATS = ("nearest", "trilinear")
NORMALIZATIONS = ("max", "percentile", "none")
ONE_PER_VOXEL = ("center", "random")  # voxel exports with one point per voxel above the threshold
BY_MASS = ("probabilistic", "weighted")  # voxel exports drawing a number of points (default: the data's per mass)
EXPORT_METHODS = BY_MASS + ONE_PER_VOXEL  # points drawn inside voxels
CACHE_MODES = ("memory", "disk", "none")  # stage 2's latent cache
OUTPUT_FORMATS = ("nifti", "csv", "h5")
SAMPLERS = {"rflow": ("RFlow",), "ddpm": ("DDIM", "DDPM")}  # stage 2's objectives and their samplers, default first
OBJECTIVES = tuple(SAMPLERS)
TIMESTEP_SAMPLINGS = ("uniform", "logit-normal", "high-noise")  # stage 2's training timesteps
LATENT_DRAWS = ("sample", "mean")  # stage 2's latents: a draw of the encoder's posterior, or its mean
SCHEDULERS = ("RFlow", "DDPM", "DDIM")  # every sampler of SAMPLERS
NOISE_SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta")
EVALUATION_SETS = (
    "train_vs_heldout",
    "reconstruction",
    "reconstruction_refined",
    "mean_grid_baseline",
    "samples",
    "samples_voxel_uniform",
)


# ---------------------------------------------------------------------------------------------------- the table
_POSITIVE, _NON_NEGATIVE, _FRACTION = integer(1), number(0), number(0, 1)

SETTINGS = {
    # switches
    "amp": flag,
    "cpu_bf16": flag,
    "fast_dev_run": flag,
    "with_nonlocal_attn": flag,
    "preview": flag,
    "overwrite": flag,
    "scale_lr": flag,
    # data and training
    "voxel_size": voxel_size,
    "cache_rate": _FRACTION,
    "num_workers": integer(0),
    "n_epochs": _POSITIVE,
    "batch_size": _POSITIVE,
    "fast_dev_run_batches": _POSITIVE,
    "learning_rate": number(0, above=True),
    "discriminator_learning_rate": number(0, above=True),
    "adv_weight": _NON_NEGATIVE,
    "perceptual_weight": _NON_NEGATIVE,
    "kl_weight": _NON_NEGATIVE,
    "l1_weight": _NON_NEGATIVE,
    "mse_weight": _NON_NEGATIVE,
    "fg_l1_weight": _NON_NEGATIVE,
    "dice_weight": _NON_NEGATIVE,
    "fg_weight": number(1),
    "fg_threshold": number(0, 1, above=True),
    "autoencoder_warm_up_n_epochs": integer(0),
    "val_interval": _POSITIVE,
    "image_log_interval": _POSITIVE,
    "generate_samples_interval": _POSITIVE,
    "num_monitor_samples": _POSITIVE,
    "seed": integer(),
    "device": device,
    "resume_from": existing_file(optional=True),
    "pretrained": existing_file(optional=True),
    "key_metric": choice("val_dice", "val_iou", "val_l1", "val_psnr"),
    # networks
    "num_channels": list_of(_POSITIVE),
    "latent_channels": _POSITIVE,
    "num_res_blocks": _POSITIVE,
    "norm_num_groups": _POSITIVE,
    "attention_levels": list_of(flag),
    "num_head_channels": list_of(integer(0)),
    "discriminator_channels": _POSITIVE,
    "discriminator_num_layers": _POSITIVE,
    "discriminator_norm": choice("BATCH", "INSTANCE", "GROUP", "batch", "instance", "group"),
    # diffusion
    "num_train_timesteps": _POSITIVE,
    "num_inference_steps": _POSITIVE,
    "noise_schedule": choice(*NOISE_SCHEDULES),
    "beta_start": number(0, 1, above=True),
    "beta_end": number(0, 1, above=True),
    "scale_factor": number(0, above=True, optional=True),
    "scale_factor_batches": _POSITIVE,
    "latent_cache": choice(*CACHE_MODES),
    # large fields: patches in training, tiles in sampling
    "patch_size": optional_voxel_size,
    "latent_patch_size": optional_voxel_size,
    "sw_batch_size": _POSITIVE,
    "sw_overlap": number(0, 0.75),
    "tile_overlap": number(0, 0.75),
    "field_size_nm": list_of(number(0, above=True), at_least=3, optional=True),
    # augmentation (both training stages and the fine stage)
    "flip_x": flag,
    "flip_y": flag,
    "rotate_z": flag,
    "flip_z": flag,
    # the fine stage
    "points_per_volume": _POSITIVE,
    "lr_warmup_fraction": number(0, 0.5),
    "lr_decay": flag,
    "ema_decay": number(0, 1),
    "use_reconstructions": flag,
    "reconstruction_fraction": _FRACTION,
    "refiner_channels": list_of(_POSITIVE),
    "refiner_hidden": _POSITIVE,
    "refiner_layers": _POSITIVE,
    "flow_steps": integer(1, optional=True),  # None: the fine stage's checkpoint's
    # sampling and evaluation
    "num_samples": _POSITIVE,
    "scheduler": choice(*SCHEDULERS, optional=True, ignore_case=True),
    "eta": number(0, 1, optional=True),  # None: the sampler's default (schedulers.RFLOW_ETA for RFlow)
    "eta_below": number(0, 1, optional=True),
    "objective": choice(*OBJECTIVES),
    "timestep_sampling": choice(*TIMESTEP_SAMPLINGS),
    "latent_draw": choice(*LATENT_DRAWS),
    "method": choice(*EXPORT_METHODS),
    "threshold": number(0, 1, optional=True),  # None: the fine stage's own, or voxelize.EXPORT_THRESHOLD
    "num_points": integer(1, optional=True),
    "output_formats": subset(*OUTPUT_FORMATS),
    "pixel_nm": number(0, above=True),
    "emd_points": integer(0, optional=True),
    "export_num_points": integer(1, optional=True),
    "max_reference_clouds": integer(2, optional=True),
    "num_pictures": _POSITIVE,
    "use_refiner": flag,
    "reference_file": existing_file(optional=True),
    "reference_box_tolerance": number(0),
    "structure_radius_nm": number(0, above=True),
    "pair_range_nm": list_of(number(0)),
    "realism_test": flag,
    "realism_folds": integer(2),
    "sets": list_of(choice(*EVALUATION_SETS), optional=True),
    "nn_bins": _POSITIVE,
    "z_bins": _POSITIVE,
}
# where an id means something else in one config
STAGE_SETTINGS = {
    "evaluate": {"num_points": _POSITIVE, "num_workers": integer(-1), "threshold": number(0, 1)},
    "train_refiner": {"key_metric": choice("val_nn_w1"), "flow_steps": _POSITIVE, "threshold": number(0, 1)},
    "inference": {"method": choice("refine", *EXPORT_METHODS)},
}


_FROM_AUTOENCODER = "the autoencoder checkpoint {autoencoder_path}"
# ids a stage computes from a checkpoint (or the conversion): given a value, they would replace that computation
DERIVED = {
    "train_diffusion": {
        "voxel_size": (_FROM_AUTOENCODER, "train stage 1 at the voxel_size you want"),
        "spatial_size": (_FROM_AUTOENCODER, "train stage 1 at the voxel_size you want"),
        "autoencoder_patch_size": (_FROM_AUTOENCODER, "train stage 1 with the patch_size you want"),
        "latent_shape": (_FROM_AUTOENCODER, "set latent_patch_size (latent voxels) to train on smaller latent tiles"),
        "dataset_info": (_FROM_AUTOENCODER, "train stage 1 on the conversion you want"),
    },
    "train_refiner": {
        "voxel_size": (
            _FROM_AUTOENCODER + " (with use_reconstructions false, the conversion's dataset_info.json)",
            "train stage 1 (or convert) at the voxel_size you want",
        ),
        "dataset_info": ("the conversion's dataset_info.json", "set dataset_dir"),
        "geometry": ("the conversion's dataset_info.json and voxel_size", "set dataset_dir"),
        "coupling": ("the conversion's dataset_info.json", "set dataset_dir"),
    },
}


def settings_of(stage):
    return {**SETTINGS, **STAGE_SETTINGS.get(stage, {})}


def check_values(values, stage):
    """Validate ``{id: value}`` (literal values only) for ``stage``; returns the values as the code uses them."""
    table = settings_of(stage)
    return {key: table[key](value, key) if key in table else value for key, value in values.items()}


def grouped(defaults, **given):
    """The settings of each group ``name=given``: ``given`` over ``defaults[name]``. A key the group does not have is
    refused in one line naming the group and its keys."""
    settings = {}
    for name, values in given.items():
        unknown = sorted(set(values or {}) - set(defaults[name]))
        if unknown:
            raise UserError(f"{name}: no setting {unknown[0]!r} in this group; it has {', '.join(defaults[name])}")
        settings[name] = {**defaults[name], **(values or {})}
    return settings


# ---------------------------------------------------------------------------------------------------- bundle configs


def check_config(stage):
    """Start-up check of the bundle config being run (call it first in ``initialize``).

    Refuses an id given on the command line that the configs do not define (naming the closest one), validates every
    setting of :data:`SETTINGS` that holds a plain value, and writes the parsed values (``false`` → ``False``) back
    into the config, so every ``@id`` reads the real value. Returns the checked values.
    """
    from scripts.runtime.dependencies import check_dependencies

    check_dependencies()
    parser = _running_parser()
    if parser is None:
        if command_line_overrides() is not None:  # a bundle run whose parser is out of reach: MONAI changed
            raise RuntimeError(
                "check_config: no monai.bundle.ConfigParser on the call stack of this `monai.bundle run`; this MONAI's "
                "bundle runner is not one the settings check knows (see scripts/runtime/settings.py)"
            )
        return {}  # a direct call, not through a config: nothing to check
    check_command_line_ids()
    _check_not_derived(parser, stage)
    literal = {k: v for k, v in parser.config.items() if k in settings_of(stage) and not _is_expression(v)}
    checked = check_values(literal, stage)
    changed = {k: v for k, v in checked.items() if not _same(v, literal[k])}
    if changed:
        parser.update(changed)  # the config is re-parsed before the next expression of ``initialize`` runs
    return checked


def _check_not_derived(parser, stage):
    """Refuse a value given to an id of :data:`DERIVED` (the config computes it), saying where it comes from."""
    for key, (source, hint) in DERIVED.get(stage, {}).items():
        value = parser.config.get(key)
        if key in parser.config and not _is_expression(value) and not isinstance(value, dict):
            path = parser.get_parsed_content("autoencoder_path") if "{autoencoder_path}" in source else None
            raise UserError(
                f"{key}: {stage} reads it from {source.format(autoencoder_path=path)}, so it cannot be set here "
                f"(got {value!r}); {hint}"
            )


def _same(a, b):
    return type(a) is type(b) and a == b


def _is_expression(value):
    return isinstance(value, str) and value[:1] in ("$", "@", "%")


def _running_parser():
    """The ``monai.bundle.ConfigParser`` evaluating the current expression (found on the call stack).

    Config expressions cannot name their parser, and the parser is the one place every ``@id`` reads from.
    """
    from monai.bundle import ConfigParser

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ConfigParser):
            return candidate
        frame = frame.f_back
    return None


RUN_ARGUMENTS = ("run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file")
SPECIAL_KEYS = ("_target_", "_disabled_", "_requires_", "_desc_", "_mode_")


def command_line_overrides(argv=None):
    """``{id: value}`` given to ``python -m monai.bundle run`` (``--id value`` or ``--id=value``), and the run
    arguments (``config_file``, ``args_file``, ...); ``None`` when this process is not such a run."""
    argv = sys.argv if argv is None else argv
    if not argv or Path(argv[0]).parts[-3:] != ("monai", "bundle", "__main__.py") or "run" not in argv[1:2]:
        return None
    pairs, tokens = {}, list(argv[2:])
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--"):
            continue
        key, _, value = token[2:].partition("=")
        if not _ and tokens and not tokens[0].startswith("--"):
            value = tokens.pop(0)
        pairs[key.replace("::", "#")] = value
    return pairs


def check_command_line_ids(argv=None):
    """Refuse ids on the command line that no config of this run defines, naming the closest known id."""
    from monai.bundle import ConfigParser

    pairs = command_line_overrides(argv)
    if pairs is None:
        return
    if pairs.get("args_file"):
        args = ConfigParser.load_config_files(pairs["args_file"])
        pairs = {**{k: v for k, v in args.items() if k not in pairs}, **pairs}
    files = literal(pairs.get("config_file"))
    config = ConfigParser.load_config_files(files if isinstance(files, (list, tuple)) else [files])
    known = set(_ids(config))
    top = [k for k in config if not str(k).startswith("_")]
    for key in pairs:
        if key in RUN_ARGUMENTS or key in known:
            continue
        parent, _, last = key.rpartition("#")
        if last in SPECIAL_KEYS and parent in known:
            continue
        raise UserError(f"{key}: no such setting in {files}{closest(key, top if '#' not in key else known)}")


def _ids(config, prefix=""):
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        key = f"{prefix}{key}"
        yield key
        yield from _ids(value, key + "#")
