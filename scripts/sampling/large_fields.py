"""Fields larger than the training box: latents denoised in overlapping tiles, decoded by sliding window.

The UNet is trained on latents of one shape (a tile). A larger latent is covered by tiles of that shape that
overlap by ``overlap`` of their length; at every denoising step each tile's prediction is made, the predictions are
blended with Gaussian weights where tiles overlap, and the scheduler steps the whole latent once (MultiDiffusion,
Bar-Tal et al. 2023). Every step thus sees one latent, so neighbouring tiles agree and no seam forms. The decoder
then runs window by window (MONAI's ``SlidingWindowInferer``, Gaussian blending), writing into one float32 grid
on the host: a field costs memory in proportion to its area, not to the square of it.
"""

import itertools
import math

import numpy as np
import torch
from monai.data.utils import compute_importance_map
from monai.inferers import SlidingWindowInferer
from monai.networks.schedulers import RFlowScheduler
from scripts.networks.precision import autocast_context
from scripts.runtime.progress import progress

SIGMA_SCALE = 0.25  # the blending Gaussian's σ as a fraction of the tile: flat enough that overlaps average


def tile_starts(size, tile, overlap):
    """First indices of tiles of length ``tile`` covering ``[0, size)``, neighbours sharing at least ``overlap`` of a
    tile, spread evenly so the last one ends at ``size``."""
    if size <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    n = math.ceil((size - tile) / stride) + 1
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def tile_slices(shape, tile, overlap):
    """Spatial slices of the tiles covering a grid of ``shape`` (every axis)."""
    starts = [tile_starts(s, min(t, s), overlap) for s, t in zip(shape, tile)]
    return [
        tuple(slice(a, a + min(t, s)) for a, t, s in zip(corner, tile, shape)) for corner in itertools.product(*starts)
    ]


def blending_weights(tile, device):
    """Gaussian weights of one tile (1, 1, x, y, z), largest at its centre."""
    weights = compute_importance_map(tuple(tile), mode="gaussian", sigma_scale=SIGMA_SCALE, device=device)
    return weights.reshape(1, 1, *tile)


def denoise_tiled(unet, scheduler, noise, tile, overlap=0.5, tile_batch=8, device="cpu", amp_dtype=None):
    """Latents (n, C, X, Y, Z) from ``noise`` of that shape, denoised in tiles of spatial shape ``tile``.

    Each of the scheduler's steps runs the UNet on every tile (``tile_batch`` tiles at once, on ``device``), blends
    the predictions with Gaussian weights into one prediction for the whole latent, and steps the whole latent with
    it. The latent stays where ``noise`` is (the host for large fields).
    """
    shape = noise.shape[2:]
    tile = tuple(min(t, s) for t, s in zip(tile, shape))
    weights = blending_weights(tile, device)
    slices = tile_slices(shape, tile, overlap)
    coverage = torch.zeros((1, 1, *shape), dtype=torch.float32, device=noise.device)
    tile_weights = weights[0, 0].to(noise.device)
    for s in slices:
        coverage[(..., *s)] += tile_weights
    latent = noise
    timesteps = scheduler.timesteps
    following = torch.cat((timesteps[1:], torch.tensor([0], dtype=timesteps.dtype)))
    for t, next_t in progress(list(zip(timesteps, following)), f"denoising {len(slices)} tiles", "step"):
        prediction = torch.zeros_like(latent, dtype=torch.float32)
        for start in range(0, len(slices), tile_batch):
            chunk = slices[start : start + tile_batch]
            x = torch.cat([latent[(..., *s)] for s in chunk]).to(device)
            with torch.no_grad(), autocast_context(device, amp_dtype):
                out = unet(x, timesteps=torch.full((len(x),), float(t), device=device))
            out = (out.float() * weights).to(latent.device)
            for i, s in enumerate(chunk):
                prediction[(..., *s)] += out[i * len(latent) : (i + 1) * len(latent)]
        prediction /= coverage
        if isinstance(scheduler, RFlowScheduler):
            latent, _ = scheduler.step(prediction, t, latent, next_t)
        else:
            latent, _ = scheduler.step(prediction, t, latent)
    return latent


def decoding_window(tile):
    """The decoder's sliding window for a UNet tile: twice as wide in x and y. The decoder's GroupNorm normalises
    over its window, so wider windows come closer to the whole grid's decode (on the shipped networks: mean
    difference 0.0018 against 0.0037 for the tile itself) at the same cost per voxel."""
    return (2 * tile[0], 2 * tile[1], *tile[2:])


def decode_tiled(autoencoder, latent, scale_factor, tile, overlap=0.25, tile_batch=4, device="cpu", amp_dtype=None):
    """Grids (n, 1, X·f, Y·f, Z·f) on the host, float32, from latents (n, C, X, Y, Z) decoded window by window
    (latent windows of spatial shape ``tile``, Gaussian blending)."""
    tile = tuple(min(t, s) for t, s in zip(tile, latent.shape[2:]))
    inferer = SlidingWindowInferer(
        roi_size=tile,
        sw_batch_size=tile_batch,
        overlap=overlap,
        mode="gaussian",
        sigma_scale=SIGMA_SCALE,
        sw_device=device,
        device="cpu",
        progress=False,
    )

    def decode(z):
        with autocast_context(device, amp_dtype):
            return autoencoder.decode_stage_2_outputs(z / scale_factor).float()

    with torch.no_grad():
        return inferer(latent.float(), decode)


def field_shapes(field_nm, spacing_nm, tile, factor, unet_factor):
    """The grid of a field of ``field_nm`` (x, y, z) at ``spacing_nm`` voxels and the latent it is decoded from.

    The grid has ``ceil(field / spacing)`` voxels per axis (the field, to within one voxel; a hundredth of a voxel
    over is rounding); the latent is at least one tile on each axis where the field allows, and otherwise a whole
    number of the UNet's halvings.
    """
    grid = [max(1, math.ceil(f / s - 0.01)) for f, s in zip(field_nm, spacing_nm)]
    latent = []
    for g, t in zip(grid, tile):
        n = math.ceil(g / factor)
        latent.append(n if n >= t else unet_factor * math.ceil(n / unet_factor))
    return tuple(grid), tuple(latent)


def sampling_memory(grid, latent, n, tile, tile_batch, network_config, factor, refiner=None, num_points=0):
    """Estimated peak bytes of sampling ``n`` fields of ``grid`` voxels from latents ``latent`` (C, X, Y, Z):
    ``(host, device)``, the second being what the networks' working sets take on the device (on the host as well
    when sampling on the CPU).

    Host: the decoded grids and the sliding window's weight sum (float32), the latent with its blended prediction
    and coverage, and the ``num_points`` of one cloud (clouds are written one at a time; ``POINT_BYTES`` each).
    Device: ``tile_batch`` UNet tiles and decoder windows at about a dozen live activations of their widest level,
    and one slab of the fine stage's features.
    """
    from scripts.networks.fine_stage import POINT_BYTES, refine_slab, slab_feature_bytes

    voxels = float(np.prod(grid, dtype=np.float64))
    latent_voxels = float(np.prod(latent[1:], dtype=np.float64))
    tile_voxels = float(np.prod(tile, dtype=np.float64))
    host = 4 * voxels * (n + 1) + 4 * 4 * n * latent[0] * latent_voxels + POINT_BYTES * num_points
    unet = 12 * 4 * tile_batch * n * tile_voxels * max(network_config["unet"]["channels"])
    window_voxels = float(np.prod(decoding_window(tile), dtype=np.float64)) * factor**3
    decoder = 12 * 4 * tile_batch * window_voxels * max(network_config["autoencoder"]["channels"])
    fine = 0.0
    if refiner is not None:
        fine = slab_feature_bytes(grid, refiner, refine_slab(grid, refiner))
    return host, max(unet, decoder, fine)
