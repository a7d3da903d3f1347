"""The fine stage: points at localization precision from a grid (decoded or real) and its geometry.

A grid at 100–200 nm voxels is the coarse half of a cloud. The converter bins each localization into its voxel
``u`` and blurs the counts with a Gaussian of ``σ`` voxels, so the grid value at ``v`` is the expected number of
points whose voxel ``u`` lies at a Gaussian step ``k = v - u`` from ``v``. Read backwards, this gives the coupling
the fine stage learns from:

- **anchors**: a real point in voxel ``u`` is paired with the anchor ``v = u + k``, ``k`` drawn per axis from the
  same discrete Gaussian; over a cloud, anchors are then distributed exactly as the grid's values;
- **offsets**: a conditional flow-matching model learns the distribution of the point's position relative to its
  anchor's centre, given features of a small 3D CNN over the grid around the anchor.

Sampling runs the same way forward: anchors are drawn with probability proportional to the grid, and each gets an
offset from the flow (a few Euler steps of a small MLP). Localizations are nearly independent given the structure,
so points are drawn independently and the cost grows linearly with their number; nothing in it assumes filaments.
"""

import math

import numpy as np
import torch
from scripts.data.geometry import GridGeometry
from scripts.data.voxelize import gaussian_kernel, point_count
from scripts.runtime.errors import UserError
from scripts.runtime.resources import check_memory, physical_memory_bytes, round_down
from torch import nn


class GridFeatures(nn.Module):
    """A small fully convolutional 3D CNN: features of each voxel's neighbourhood (receptive field ``2·layers + 1``).

    Args:
        channels: output channels of each 3×3×3 convolution.
    """

    def __init__(self, channels=(32, 32, 32)):
        super().__init__()
        layers, previous = [], 1
        for c in channels:
            layers += [nn.Conv3d(previous, c, 3, padding=1), nn.SiLU()]
            previous = c
        self.net = nn.Sequential(*layers)
        self.out_channels = previous

    def forward(self, grids):
        return self.net(grids)


def time_embedding(t, frequencies):
    """Sinusoidal features of ``t`` in [0, 1]: (N,) → (N, 2·frequencies)."""
    scales = math.pi * 2.0 ** torch.arange(frequencies, device=t.device, dtype=t.dtype)
    angles = t[:, None] * scales
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class OffsetFlow(nn.Module):
    """Velocity field of a conditional flow from N(0, I) to the anchor offsets.

    It reads two kinds of features: those of the anchor voxel (where the point was counted from), through a linear
    map computed once per point (:meth:`condition`), and those at the point's current position, sampled
    trilinearly from the CNN's feature map at every step, so the flow can follow the local structure of the grid.
    """

    def __init__(self, feature_channels, hidden=64, num_layers=3, time_frequencies=6):
        super().__init__()
        self.time_frequencies = time_frequencies
        self.condition_net = nn.Linear(feature_channels, hidden)
        self.position_net = nn.Linear(feature_channels, hidden)
        self.input_net = nn.Linear(3 + 2 * time_frequencies, hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_layers - 1))
        self.output = nn.Linear(hidden, 3)
        self.act = nn.SiLU()

    def condition(self, features):
        return self.condition_net(features)

    def velocity(self, x, t, condition, local_features):
        h = self.input_net(torch.cat([x, time_embedding(t, self.time_frequencies)], dim=1))
        h = self.act(h + condition + self.position_net(local_features))
        for layer in self.hidden:
            h = h + self.act(layer(h))
        return self.output(h)


def sample_features(maps, batch_index, positions):
    """Trilinear samples (N, C) of feature maps (B, C, X, Y, Z) at continuous voxel ``positions`` (N, 3) (centres at
    ``i + 0.5``) of volume ``batch_index`` (N,); positions beyond the grid read its border."""
    size = torch.tensor(maps.shape[2:], dtype=positions.dtype, device=positions.device)
    normalised = (2 * positions / size - 1).flip(-1)  # grid_sample's last coordinate is the last axis (z)
    out = positions.new_empty((len(positions), maps.shape[1]))
    for b in torch.unique(batch_index).tolist():
        mask = batch_index == b
        sampled = torch.nn.functional.grid_sample(
            maps[b : b + 1], normalised[mask].view(1, -1, 1, 1, 3), padding_mode="border", align_corners=False
        )
        out[mask] = sampled.view(maps.shape[1], -1).T
    return out


class Refiner(nn.Module):
    """Grid features (:class:`GridFeatures`) and the offset flow (:class:`OffsetFlow`) of the fine stage.

    Args:
        channels: channels of the CNN's convolutions.
        hidden: width of the flow's MLP; num_layers: its depth.
        offset_scale: per-axis scale of the offsets in voxels (:func:`offset_scale`), kept as a buffer so the
            checkpoint carries it.
    """

    def __init__(self, channels=(16, 16, 16), hidden=64, num_layers=3, offset_scale=(1.0, 1.0, 1.0)):
        super().__init__()
        self.features = GridFeatures(channels)
        self.flow = OffsetFlow(self.features.out_channels, hidden, num_layers)
        self.register_buffer("offset_scale", torch.as_tensor(offset_scale, dtype=torch.float32))

    def _velocity(self, maps, batch_index, anchors, x, t, condition):
        positions = anchors.to(x.dtype) + 0.5 + x * self.offset_scale
        return self.flow.velocity(x, t, condition, sample_features(maps, batch_index, positions))

    def loss(self, grids, batch_index, anchors, offsets, generator=None):
        """Flow-matching loss of normalised ``offsets`` (N, 3) of points anchored at voxels ``anchors`` (N, 3) of
        volumes ``batch_index`` (N,) of ``grids`` (B, 1, X, Y, Z)."""
        maps = self.features(grids)
        condition = self.flow.condition(maps[batch_index, :, anchors[:, 0], anchors[:, 1], anchors[:, 2]])
        noise = torch.randn(offsets.shape, generator=generator).to(offsets.device)
        t = torch.rand(len(offsets), generator=generator).to(offsets.device)
        x = (1 - t[:, None]) * noise + t[:, None] * offsets
        velocity = self._velocity(maps, batch_index, anchors, x, t, condition)
        return torch.nn.functional.mse_loss(velocity, offsets - noise)

    @torch.no_grad()
    def sample(self, grid, anchors, steps=12, generator=None, chunk=1 << 18):
        """Continuous voxel positions (N, 3) of points anchored at ``anchors`` (N, 3) of one ``grid`` (X, Y, Z):
        ``steps`` Euler steps of the flow from N(0, I), ``chunk`` points at a time."""
        maps = self.features(torch.as_tensor(grid, dtype=torch.float32, device=self.offset_scale.device)[None, None])
        out = []
        for start in range(0, len(anchors), chunk):
            a = anchors[start : start + chunk].to(maps.device)
            index = torch.zeros(len(a), dtype=torch.long, device=maps.device)
            condition = self.flow.condition(maps[0, :, a[:, 0], a[:, 1], a[:, 2]].T)
            x = torch.randn((len(a), 3), generator=generator).to(maps.device)
            for s in range(steps):
                t = torch.full((len(x),), s / steps, device=x.device)
                x = x + self._velocity(maps, index, a, x, t, condition) / steps
            out.append((a + 0.5 + x * self.offset_scale).cpu())
        return torch.cat(out) if out else torch.zeros((0, 3))


# ------------------------------------------------------------------------------------------------ the coupling


def offset_scale(sigma_voxels, splat="trilinear"):
    """Per-axis standard deviation of a point's offset from its anchor's centre, in voxels: the Gaussian step and
    the position relative to the voxel it was counted in (variance 1/12 inside its own voxel; 1/6 for a trilinear
    splat, whose voxel is one of the two nearest centres). Offsets are divided by it so the flow's target is of unit
    scale."""
    sigma = np.broadcast_to(np.asarray(sigma_voxels, np.float64), (3,))
    return np.sqrt(sigma**2 + (1.0 / 6.0 if splat == "trilinear" else 1.0 / 12.0))


def gaussian_steps(n, sigma_voxels, generator=None):
    """``n`` integer steps (n, 3), per axis from the converter's discrete Gaussian of ``sigma_voxels`` (0: none)."""
    steps = torch.zeros((n, 3), dtype=torch.long)
    for axis, s in enumerate(np.broadcast_to(np.asarray(sigma_voxels, np.float64), (3,))):
        if s > 0:
            kernel = torch.from_numpy(gaussian_kernel(s).astype(np.float64))
            radius = len(kernel) // 2
            steps[:, axis] = torch.multinomial(kernel, n, replacement=True, generator=generator) - radius
    return steps


def splat_voxel(points_voxel, shape, splat="trilinear", generator=None):
    """The voxel each point was counted in: its own ('nearest') or, 'trilinear', one of the 8 nearest voxel
    centres drawn with the splat's linear weights (per axis, up with probability equal to the fraction past the
    lower centre), clamped to the grid as the converter does."""
    points_voxel = torch.as_tensor(points_voxel, dtype=torch.float64)
    upper = torch.tensor(shape) - 1
    if splat == "nearest":
        return torch.minimum(points_voxel.floor().long().clamp(min=0), upper)
    y = points_voxel - 0.5
    low = y.floor()
    up = torch.rand(y.shape, generator=generator, dtype=torch.float64) < (y - low)
    return torch.minimum((low.long() + up.long()).clamp(min=0), upper)


def couple(points_voxel, shape, sigma_voxels, splat="trilinear", generator=None):
    """Anchors and normalised offsets of points given in continuous voxel coordinates (voxel ``i`` spans
    ``[i, i + 1)``): ``(anchors (M, 3) long, offsets (M, 3) float, kept (n,) bool)``. Anchors that fall outside the
    grid are dropped (the grid holds no value there)."""
    points_voxel = torch.as_tensor(points_voxel, dtype=torch.float64)
    upper = torch.tensor(shape) - 1
    voxel = splat_voxel(points_voxel, shape, splat, generator)
    anchors = voxel + gaussian_steps(len(voxel), sigma_voxels, generator)
    kept = ((anchors >= 0) & (anchors <= upper)).all(dim=1)
    anchors = anchors[kept]
    scale = torch.from_numpy(offset_scale(sigma_voxels, splat))
    offsets = (points_voxel[kept] - (anchors + 0.5)) / scale
    return anchors, offsets.float(), kept


def draw_anchors(grid, num_points, threshold=0.0, generator=None):
    """``num_points`` voxel indices (n, 3) drawn with probability proportional to the grid's values above
    ``threshold`` (the coupling's anchor distribution)."""
    grid = torch.as_tensor(np.asarray(grid, np.float32))
    flat = grid.flatten().double()
    weights = torch.where(flat > threshold, flat, torch.zeros_like(flat))
    if num_points == 0 or weights.sum() <= 0:
        return torch.zeros((0, 3), dtype=torch.long)
    chosen = _multinomial(weights, num_points, generator)
    return torch.stack(torch.unravel_index(chosen, grid.shape), dim=1)


def _multinomial(weights, n, generator):
    """``torch.multinomial`` with replacement for any ``n`` (it is limited to 2^24 categories): inverse-CDF draws."""
    cdf = torch.cumsum(weights, 0)
    u = torch.rand(n, generator=generator, dtype=torch.float64) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp(max=len(weights) - 1)


def refine_grid(
    refiner,
    grid,
    geometry,
    num_points=None,
    threshold=0.0,
    flow_steps=12,
    generator=None,
    retries=4,
    slab_voxels=None,
    points_per_mass=None,
):
    """``num_points`` points (nm, float64 (n, 3)) from ``grid`` (X, Y, Z), inside ``geometry``'s box; by default
    as many as the training data's density gives (``points_per_mass``, :func:`~scripts.data.voxelize.point_count`).

    Anchors are drawn with probability proportional to the grid's values above ``threshold``, then placed by the
    flow; a point the flow puts outside the box is drawn again from its anchor (``retries`` times) and then
    clamped to the box, which leaves the rare remainder on the box's faces.

    With ``slab_voxels``, a large grid is refined in slabs of that many planes along x, each with a margin of
    planes beyond the CNN's reach on both sides (its features are then those of the whole grid): the points are
    shared among the slabs by their mass, and memory holds one slab's features instead of the whole grid's.
    """
    grid = np.asarray(grid, np.float32)
    shape = tuple(grid.shape)
    geometry = geometry.with_shape(shape)
    num_points = point_count(grid, geometry, num_points, points_per_mass)
    slab = shape[0] if slab_voxels is None else max(1, int(slab_voxels))
    starts = list(range(0, shape[0], slab))
    counts = [int(num_points)]
    if len(starts) > 1:
        masses = torch.tensor([_mass(grid[a : a + slab], threshold) for a in starts], dtype=torch.float64)
        counts = _share(int(num_points), masses, generator)
    margin = _margin(refiner)
    upper = torch.tensor(shape, dtype=torch.float32)
    out = []
    for start, n in zip(starts, counts):
        if n == 0:
            continue
        lo, hi = max(0, start - margin), min(shape[0], start + slab + margin)
        part = torch.from_numpy(grid[lo:hi])
        anchors = draw_anchors(part[start - lo : start - lo + slab], n, threshold, generator)
        anchors[:, 0] += start - lo  # anchors in the slab, the margin only read for features
        shift = torch.tensor([lo, 0, 0], dtype=torch.float32)
        positions = refiner.sample(part, anchors, flow_steps, generator) + shift
        for _ in range(retries):
            outside = ((positions < 0) | (positions > upper)).any(dim=1)
            if not outside.any():
                break
            positions[outside] = refiner.sample(part, anchors[outside], flow_steps, generator) + shift
        out.append(positions)
    positions = torch.cat(out) if out else torch.zeros((0, 3))
    points = geometry.to_nm(positions.double().numpy())
    # on the box, a thousandth of a nanometre inside: files written at 0.001 nm keep the points inside it
    return np.clip(points, geometry.lo + 1e-3, np.asarray(geometry.box_max_nm) - 1e-3)


MARGIN_VOXELS = 6  # planes beyond the CNN's receptive field: a point's offset from its anchor rarely exceeds them
SLAB_BYTES = 2**30  # the fine stage's features of one slab of a large grid
# peak host bytes per point of refine_grid (and of the voxel exports): the anchors, the positions in float32 and
# float64, in nm and clipped, live together at the end (measured on the CPU with the shipped fine stage: 106 bytes a
# point from 4 to 16 million points, over the flow's working set of about 0.7 GB)
POINT_BYTES = 128


def _margin(refiner):
    return len(refiner.features.net) // 2 + MARGIN_VOXELS


def slab_feature_bytes(shape, refiner, slab):
    """Bytes of the fine stage's feature maps (two live convolutions and the features) over one slab."""
    planes = (shape[0] if slab is None else min(shape[0], slab + 2 * _margin(refiner))) * shape[1] * shape[2]
    return 3 * 4 * planes * max(c.out_channels for c in refiner.features.net if isinstance(c, nn.Conv3d))


def refine_slab(shape, refiner):
    """Planes per slab for :func:`refine_grid` on a grid of ``shape`` (``None``: the whole grid fits one)."""
    per_plane = slab_feature_bytes((1, *shape[1:]), refiner, None)
    slab = max(8, int(SLAB_BYTES // per_plane) - 2 * _margin(refiner))
    return None if slab >= shape[0] else slab


def refine_memory(shape, refiner, num_points):
    """Estimated peak host bytes of :func:`refine_grid` on the CPU for a grid of ``shape`` (slabs of
    :func:`refine_slab`): the grid, one slab's features and ``num_points`` points."""
    voxels = float(np.prod(shape, dtype=np.float64))
    return 4 * voxels + slab_feature_bytes(shape, refiner, refine_slab(shape, refiner)) + POINT_BYTES * num_points


def check_point_memory(num_points, other_bytes, what):
    """Refuse ``num_points`` points per cloud when they and ``other_bytes`` (whatever else the run holds) exceed this
    machine's memory; ``what`` names the setting, and the message says how many points would fit."""
    total = physical_memory_bytes()
    fit = round_down((total - other_bytes) // POINT_BYTES) if total else 0
    check_memory(
        other_bytes + POINT_BYTES * num_points, what, f"at most about {fit} points fit; set a smaller num_points"
    )


def _mass(grid, threshold):
    return float(np.where(grid > threshold, grid, 0).sum(dtype=np.float64))


def _share(n, masses, generator):
    """``n`` points shared among parts with probability proportional to their ``masses`` (a multinomial draw)."""
    if n == 0 or masses.sum() <= 0:
        return [0] * len(masses)
    parts = _multinomial(masses, n, generator)
    return torch.bincount(parts, minlength=len(masses)).tolist()


def coupling(dataset_info, geometry):
    """How the converter made a dataset's grids, as the fine stage reads them on ``geometry``'s grid: the
    Gaussian's σ in its voxels (0 for density and occupancy grids) and the splat ('nearest' for conversions made
    before trilinear splats)."""
    voxelization = dataset_info.get("voxelization") or {}
    sigma_nm = np.asarray(voxelization.get("sigma_nm", [0.0, 0.0, 0.0]), np.float64)
    if voxelization.get("method", "gaussian") != "gaussian":
        sigma_nm = np.zeros(3)
    return {"sigma_voxels": (sigma_nm / geometry.spacing_nm).tolist(), "splat": voxelization.get("splat", "nearest")}


def sampling_settings(refiner_checkpoint, flow_steps=None, threshold=None):
    """The fine stage's ``(flow_steps, threshold)``: those given, else those its checkpoint records (the flow steps
    it was validated with, and the threshold it was trained with: 0, every voxel anchors points, as the coupling
    draws anchors from the whole grid; a higher one drops the faint voxels' mass and crowds their points onto the
    bright ones)."""
    recorded = refiner_checkpoint["sampling"]
    return (flow_steps or recorded["flow_steps"], recorded.get("threshold", 0.0) if threshold is None else threshold)


def background_level(items, dataset_info):
    """The level :func:`~scripts.data.voxelize.as_training_grid` raises decoded grids to: the density of the training
    clouds' localizations in the voxels their reconstructions draw as 0, in grid units (``points_per_mass``).

    The decoder draws a grid's faint voxels as 0, and what those voxels held is the sparse background (and the
    farthest flanks of the structure); raised to this level, they anchor as many points per µm³ as the training
    clouds have there. ``items``: the fine stage's training items (:func:`scripts.data.datasets.cloud_items`: the
    grid's ``points`` in voxel coordinates and its reconstruction ``recon``). 0 without reconstructions or without
    the training data's points per unit of grid mass.
    """
    points_per_mass = (dataset_info.get("points_per_mass") or {}).get("mean")
    with_recon = [it for it in items if "recon" in it]
    if not with_recon or not points_per_mass:
        return 0.0
    geometry = GridGeometry.from_dict(dataset_info["geometry"])
    points, volume_um3 = 0, 0.0
    for item in with_recon:
        empty = np.asarray(item["recon"])[0] <= 0
        voxel = np.floor(np.asarray(item["points"])).astype(np.int64).clip(0, np.array(empty.shape) - 1)
        points += int(empty[tuple(voxel.T)].sum())
        volume_um3 += int(empty.sum()) * float(np.prod(geometry.with_shape(empty.shape).spacing_nm / 1000.0))
    return float(points / (volume_um3 * points_per_mass)) if volume_um3 else 0.0


def sampling_background(refiner_checkpoint):
    """The background level the fine stage recorded (:func:`background_level`); 0 for checkpoints without one."""
    return float(refiner_checkpoint["sampling"].get("background") or 0.0)


def check_spacing(refiner_checkpoint, geometry, what="this grid"):
    """Refuse a grid whose voxels differ from those the fine stage was trained on (the box may differ: large
    fields)."""
    trained = (
        GridGeometry.from_dict(refiner_checkpoint["dataset_info"]["geometry"])
        .with_shape(tuple(refiner_checkpoint["voxel_size"]))
        .spacing_nm
    )
    if not np.allclose(geometry.spacing_nm, trained, rtol=0.01):
        raise UserError(
            f"{what}: has voxels of {np.round(geometry.spacing_nm, 1).tolist()} nm, but the fine stage was trained on "
            f"{np.round(trained, 1).tolist()} nm; resample the grid or train the fine stage on such grids"
        )


def check_grid(values, what="this grid"):
    """Refuse a grid the fine stage cannot read as densities: NaN or infinite voxels, or negative ones."""
    finite = np.isfinite(values)
    if not finite.all():
        raise UserError(
            f"{what}: NaN or infinite values in {_voxels(int((~finite).sum()))}; a grid holds finite densities (fix "
            "or zero those voxels)"
        )
    negative = int((values < 0).sum())
    if negative:
        raise UserError(
            f"{what}: negative values in {_voxels(negative)} (down to {values.min():.3g}); a grid holds densities of 0 "
            "or more (clip them to 0 if they are noise)"
        )


def _voxels(n):
    return f"{n} voxel" + ("s" if n != 1 else "")
