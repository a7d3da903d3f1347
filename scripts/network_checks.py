"""Checks of network settings against the data, done at start-up so a bad config gets one line, not a trace."""

import numpy as np
import torch
from monai.networks.nets import PatchDiscriminator
from scripts.errors import UserError
from scripts.geometry import as_shape
from scripts.settings import check_memory


def check_divisible(voxel_size, levels, what):
    """Refuse a ``voxel_size`` the network's ``levels`` halvings cannot take."""
    shape, factor = as_shape(voxel_size), 2**levels
    if any(s % factor for s in shape):
        raise UserError(
            f"voxel_size: {list(shape)} is not divisible by {factor}, which the {what}'s {levels} downsamplings need; "
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


def check_autoencoder(autoencoder_args, voxel_size):
    """The grid must survive the encoder's halvings; channel settings must agree."""
    channels = _check_channels(autoencoder_args, "autoencoder")
    return check_divisible(voxel_size, len(channels) - 1, "autoencoder")


def latent_shape(autoencoder_args, voxel_size):
    """(C, X, Y, Z) of the autoencoder's latent for a ``voxel_size`` grid."""
    factor = 2 ** (len(autoencoder_args["channels"]) - 1)
    return (autoencoder_args["latent_channels"], *(s // factor for s in as_shape(voxel_size)))


def check_training_memory(autoencoder_args, voxel_size, batch_size, device="cpu"):
    """Refuse, before any data is loaded, a grid whose training step cannot fit in memory.

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
                f"voxel_size: {list(as_shape(voxel_size))} needs about {needed / 2**30:.3g} GiB to train at batch "
                f"{batch_size} (estimated), but {torch.cuda.get_device_name(device)} has {total / 2**30:.3g} GiB; "
                "use a smaller voxel_size or batch_size"
            )
        return needed
    check_memory(
        needed,
        f"voxel_size: {list(as_shape(voxel_size))} at batch {batch_size}",
        "use a smaller voxel_size or batch_size",
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


def check_diffusion(unet_args, latent):
    """The diffusion UNet's halvings must fit the latent grid; channel settings must agree."""
    channels = _check_channels(unet_args, "diffusion UNet")
    heads = unet_args.get("num_head_channels")
    if isinstance(heads, (list, tuple)) and len(heads) != len(channels):
        raise UserError(f"diffusion UNet: num_head_channels has {len(heads)} entries for {len(channels)} levels")
    check_divisible(list(latent[1:]), len(channels) - 1, "diffusion UNet (on the latent grid)")
