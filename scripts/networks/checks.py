"""Checks of network settings against the data, done at start-up so a bad config gets one line, not a trace."""

from typing import NamedTuple, Optional

import numpy as np
import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet, PatchDiscriminator
from scripts.data.geometry import as_shape
from scripts.networks.build import downsampling
from scripts.runtime.errors import UserError
from scripts.runtime.resources import check_memory


def check_divisible(voxel_size, channels, what, name="voxel_size"):
    """Refuse a ``voxel_size`` (the setting ``name``) the halvings of a network with ``channels`` cannot take."""
    shape, factor, levels = as_shape(voxel_size, name), downsampling(channels), len(channels) - 1
    if any(s % factor for s in shape):
        raise UserError(
            f"{name}: {list(shape)} is not divisible by {factor}, which the {what}'s {levels} downsamplings need; "
            f"use e.g. {[max(factor, int(round(s / factor)) * factor) for s in shape]}"
        )
    return shape


def _check_channels(args, what):
    channels = list(args["channels"])
    groups = args.get("norm_num_groups", 32)
    bad = [c for c in channels if c % groups]
    if bad:
        raise UserError(f"{what}: norm_num_groups {groups} does not divide channels {bad}")
    for key in ("attention_levels",):
        if key in args and len(args[key]) != len(channels):
            raise UserError(f"{what}: {key} has {len(args[key])} entries for {len(channels)} channel levels")
    return channels


def _check_builds(network, args, what):
    """Build ``network(**args)`` on the meta device (no memory, no weights): a setting MONAI refuses, or cannot build
    with, is one line at start-up rather than a trace when the network is first made, after the data are read."""
    try:
        with torch.device("meta"):
            network(**args)
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise UserError(f"{what}: MONAI's {network.__name__} cannot be built with these settings ({e})") from None


def autoencoder_grid(autoencoder_args, voxel_size):
    """The grid shape (X, Y, Z) of ``voxel_size``, refused unless it survives the encoder's halvings and the channel
    settings agree."""
    channels = _check_channels(autoencoder_args, "autoencoder")
    _check_builds(AutoencoderKL, autoencoder_args, "autoencoder")
    return check_divisible(voxel_size, channels, "autoencoder")


def autoencoder_patch(autoencoder_args, patch_size, voxel_size):
    """The training patch (X, Y, Z) of ``patch_size`` (``None``: whole grids, returned as ``None``): no larger than
    the grid ``voxel_size`` on any axis, and divisible as the autoencoder's halvings need."""
    if patch_size is None:
        return None
    patch, grid = as_shape(patch_size, "patch_size"), as_shape(voxel_size)
    if any(p > g for p, g in zip(patch, grid)):
        raise UserError(
            f"patch_size: {list(patch)} is larger than the grid (voxel_size {list(grid)}) on some axis; use at most "
            f"{[min(p, g) for p, g in zip(patch, grid)]}"
        )
    return check_divisible(patch, autoencoder_args["channels"], "autoencoder", "patch_size")


class TrainingShapes(NamedTuple):
    """Stage 1's shapes, resolved in one place: ``grid`` (the whole grid, ``voxel_size``), ``patch`` (the training
    patch, ``None`` for whole grids), ``train`` (what a training batch holds) and ``setting`` (the setting ``train``
    comes from, for messages)."""

    grid: tuple
    patch: Optional[tuple]

    @property
    def train(self):
        return self.grid if self.patch is None else self.patch

    @property
    def setting(self):
        return "voxel_size" if self.patch is None else "patch_size"


def training_shapes(autoencoder_args, voxel_size, patch_size=None):
    """:class:`TrainingShapes` of stage 1, each checked against the autoencoder (:func:`autoencoder_grid`,
    :func:`autoencoder_patch`)."""
    grid = autoencoder_grid(autoencoder_args, voxel_size)
    return TrainingShapes(grid, autoencoder_patch(autoencoder_args, patch_size, grid))


def latent_shape(autoencoder_args, voxel_size):
    """(C, X, Y, Z) of the autoencoder's latent for a ``voxel_size`` grid."""
    factor = downsampling(autoencoder_args["channels"])
    return (autoencoder_args["latent_channels"], *(s // factor for s in as_shape(voxel_size)))


def latent_patch_shape(autoencoder_args, voxel_size, patch_size=None, latent_patch_size=None):
    """(C, x, y, z) of the latents stage 2 trains on, the tiles the sampler covers a field with: ``latent_patch_size``
    (latent voxels) where set, else the latent of the autoencoder's training patch ``patch_size`` (image voxels;
    ``None``: the whole grid), no larger than the latent of the whole ``voxel_size`` grid."""
    whole = latent_shape(autoencoder_args, voxel_size)
    if latent_patch_size is None:
        return whole if patch_size is None else latent_shape(autoencoder_args, patch_size)
    patch = as_shape(latent_patch_size, "latent_patch_size")
    if any(p > w for p, w in zip(patch, whole[1:])):
        raise UserError(
            f"latent_patch_size: {list(patch)} is larger than the latent of the whole grid, {list(whole[1:])} (the "
            f"voxel_size {list(as_shape(voxel_size))} grid encoded), on some axis"
        )
    return (whole[0], *patch)


def check_training_memory(autoencoder_args, voxel_size, batch_size, device="cpu", name="voxel_size"):
    """Refuse, before any data is loaded, a grid (or patch: ``name`` is the setting it comes from) whose training
    step cannot fit in memory.

    The estimate counts about 16 float32 activations per channel and voxel at each level of the AutoencoderKL
    (kept for the backward pass, with their gradients), for the generator and the discriminator: a floor, not a
    measurement, so only grids that cannot possibly fit are refused.
    """
    voxels = float(np.prod(as_shape(voxel_size), dtype=np.float64))
    per_voxel = sum(c / 8.0**level for level, c in enumerate(autoencoder_args["channels"]))
    needed = 16 * 4 * per_voxel * voxels * batch_size * 2
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if needed > total:
            raise UserError(
                f"{name}: {list(as_shape(voxel_size))} needs about {needed / 2**30:.3g} GiB to train at batch "
                f"{batch_size} (estimated), but {torch.cuda.get_device_name(device)} has {total / 2**30:.3g} GiB; "
                f"use a smaller {name} or batch_size"
            )
        return needed
    check_memory(
        needed, f"{name}: {list(as_shape(voxel_size))} at batch {batch_size}", f"use a smaller {name} or batch_size"
    )
    return needed


def check_discriminator(discriminator_args, voxel_size, batch_size, n_volumes=None):
    """Run the discriminator on shape-only tensors for the smallest batch the loader can produce.

    A 3-layer PatchDiscriminator with batch norm leaves one value per channel on a 16³ grid at batch 1, which
    fails in training; this finds that (and grids too small for the convolutions) before any data is loaded.
    """
    shape = as_shape(voxel_size)
    smallest = batch_size if not n_volumes else (n_volumes % batch_size or batch_size)
    smallest = min(smallest, n_volumes or batch_size)
    with torch.device("meta"):
        net = PatchDiscriminator(**discriminator_args).train()
        try:
            net(torch.empty(smallest, discriminator_args.get("in_channels", 1), *shape))
        except (ValueError, RuntimeError) as e:
            raise UserError(
                f"discriminator: num_layers_d={discriminator_args.get('num_layers_d', 3)} with norm "
                f"{discriminator_args.get('norm', 'BATCH')} does not fit a {list(shape)} grid at batch {smallest} "
                f"({str(e).splitlines()[0]}); use fewer layers (discriminator_num_layers) or norm INSTANCE/"
                "a larger batch"
            ) from None
    return shape


def check_diffusion(unet_args, latent, latent_patch_size=None):
    """The diffusion UNet's halvings must fit the latent grid ``latent`` (C, x, y, z): the setting
    ``latent_patch_size`` where given, else the latent of the autoencoder's grid; channel settings must agree.

    Every level with attention, and the last level (the UNet's middle block always has attention), splits its
    channels into heads of ``num_head_channels``: there it must be a positive divisor of the level's channels.
    """
    channels = _check_channels(unet_args, "diffusion UNet")
    heads = unet_args.get("num_head_channels", 8)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels)
    if len(heads) != len(channels):
        raise UserError(f"diffusion UNet: num_head_channels has {len(heads)} entries for {len(channels)} levels")
    attention = list(unet_args.get("attention_levels", [False] * len(channels)))
    for level, (c, h) in enumerate(zip(channels, heads)):
        last = level == len(channels) - 1
        if (attention[level] or last) and (h <= 0 or c % h):
            why = "has attention" if attention[level] else "is the middle block's, which always has attention"
            good = next(d for d in (64, 32, 16, 8, 4, 2, 1) if c % d == 0)
            raise UserError(
                f"num_head_channels: {heads} has {h} at level {level}, whose {c} channels it must divide into heads "
                f"(that level {why}); use a divisor of {c} there, e.g. {good}"
            )
    _check_builds(DiffusionModelUNet, unet_args, "diffusion UNet")
    levels, factor, grid = len(channels) - 1, downsampling(channels), list(latent[1:])
    if latent_patch_size is not None:
        check_divisible(grid, channels, "diffusion UNet", "latent_patch_size")
    elif any(s % factor for s in grid):
        raise UserError(
            f"num_channels: {len(channels)} levels halve the latent grid {levels} times, which needs sizes divisible "
            f"by {factor}, but the autoencoder's latent grid is {grid}; use fewer levels, or a latent_patch_size "
            "that is divisible"
        )
