"""Stage 2's latents: encoded once per volume by the frozen autoencoder, cached, and scaled (the scale factor)."""

import hashlib
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from monai.data import CacheDataset, DataLoader, Dataset, DistributedSampler
from monai.inferers import SlidingWindowInferer
from monai.transforms import CenterSpatialCropd, Compose, EnsureTyped
from scripts.data.datasets import RandPatchd
from scripts.networks.build import downsampling
from scripts.networks.checkpoints import load_checkpoint, save_checkpoint
from scripts.runtime.errors import UserError
from scripts.runtime.settings import CACHE_MODES

logger = logging.getLogger(__name__)


class SlidingWindowEncoder:
    """The ``encode`` of an autoencoder trained on patches, for grids of any size: windows of ``roi_size`` (the
    stage-1 patch, voxels) blended with Gaussian weights give the whole grid's ``(z_mu, z_sigma)``. Grids no larger
    than a window, and every grid when ``roi_size`` is ``None``, are encoded whole.

    The overlap is raised where needed so that window strides are whole latent voxels (each window's latent then
    lands on the whole grid's latent lattice).

    Args:
        autoencoder: the frozen AutoencoderKL.
        roi_size: the window (X, Y, Z), or ``None``.
        sw_batch_size: windows encoded at once.
        overlap: the smallest share of a window its neighbours overlap on each axis.
    """

    def __init__(self, autoencoder, roi_size=None, sw_batch_size=4, overlap=0.25):
        self.autoencoder, self.roi_size = autoencoder, None if roi_size is None else tuple(roi_size)
        self.inferer = None
        if self.roi_size is not None:
            overlaps = [_aligned_overlap(r, overlap, _downsampling(autoencoder)) for r in self.roi_size]
            self.inferer = SlidingWindowInferer(self.roi_size, sw_batch_size, overlaps, mode="gaussian")

    def encode(self, images):
        if self.inferer is None or all(s <= r for s, r in zip(images.shape[2:], self.roi_size)):
            return self.autoencoder.encode(images)
        return self.inferer(images, self.autoencoder.encode)


def cache_key(weights_sha256, encoder):
    """The latent cache's key: the autoencoder weights' hash, and the sliding window's settings where ``encoder``
    has one (windows that overlap otherwise give other latents)."""
    if getattr(encoder, "inferer", None) is None:
        return weights_sha256
    window = f"{weights_sha256}|{encoder.roi_size}|{encoder.inferer.overlap}|{encoder.inferer.mode}"
    return hashlib.sha256(window.encode()).hexdigest()


def _downsampling(autoencoder):
    """How many grid voxels an AutoencoderKL's latent voxel spans on each axis."""
    return downsampling(autoencoder.encoder.channels)


def _aligned_overlap(roi, overlap, factor):
    """The overlap to give MONAI's sliding window for windows of ``roi`` voxels so that its stride,
    ``int(roi · (1 - overlap))``, is the largest multiple of ``factor`` no longer than the stride ``overlap`` gives."""
    stride = max(factor, int(roi * (1 - overlap)) // factor * factor)
    return 0.0 if stride >= roi else 1 - (stride + 0.5) / roi


def encode_volumes(autoencoder, datalist, transform, device, batch_size=2, cache_dir=None, key="", symmetries=(None,)):
    """Encode every volume once per symmetry: ``[[{"z_mu": (C, x, y, z), "z_sigma": ...} per symmetry] per volume]``
    on the CPU, in datalist order.

    ``symmetries`` are :class:`scripts.data.datasets.FlipRotate` elements (``None``: the volume as it is); encoding each
    flipped or rotated volume, rather than flipping latents, keeps augmentation exact through the autoencoder. With
    ``cache_dir``, each latent is also kept on disk under a name made from ``key`` (the autoencoder checkpoint's
    hash), the file path, its size and its modification time, and the symmetry, and read back next time.
    """
    items = [[None] * len(symmetries) for _ in datalist]
    paths = [
        [_cache_path(cache_dir, key, d["image"], s) if cache_dir else None for s in range(len(symmetries))]
        for d in datalist
    ]
    todo = []
    for i, row in enumerate(paths):
        for s, path in enumerate(row):
            if path is not None and path.is_file():
                items[i][s] = load_checkpoint(path)["latents"]
        if any(item is None for item in items[i]):
            todo.append(i)
    if todo:
        loader = DataLoader(Dataset([datalist[i] for i in todo], transform), batch_size=batch_size, shuffle=False)
        done = iter(todo)
        with torch.no_grad():
            for batch in loader:
                chunk = [next(done) for _ in range(len(batch["image"]))]
                for s, symmetry in enumerate(symmetries):
                    images = batch["image"] if symmetry is None else symmetry.grid(batch["image"])
                    z_mu, z_sigma = autoencoder.encode(images.to(device))
                    for i, mu, sigma in zip(chunk, z_mu.float().cpu(), z_sigma.float().cpu()):
                        items[i][s] = {"z_mu": mu, "z_sigma": sigma}
                        if paths[i][s] is not None:
                            save_checkpoint(paths[i][s], {"latents": items[i][s]})
    cached = (len(datalist) - len(todo)) * len(symmetries)
    logger.info(f"latents of {len(datalist)} volumes × {len(symmetries)} symmetries: {cached} from the cache")
    return items


def _cache_path(cache_dir, key, image, symmetry=0):
    stat = Path(image).stat()
    name = hashlib.sha256(f"{Path(image).resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    return Path(cache_dir) / key[:16] / f"{name}_{symmetry}.pt"


class LatentVariants(torch.utils.data.Dataset):
    """Cached latents of each volume under every symmetry; each access returns one at random (torch's generator,
    which checkpoints restore, so a resumed run draws what an uninterrupted one would), through ``crop`` when
    given (a transform of ``{"z_mu", "z_sigma"}``)."""

    def __init__(self, items, crop=None):
        self.items, self.crop = items, crop

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        variants = self.items[index]
        item = variants[int(torch.randint(len(variants), ()))] if len(variants) > 1 else variants[0]
        return item if self.crop is None else self.crop(item)


def latent_items(
    mode,
    autoencoder,
    datalist,
    transform,
    device,
    batch_size,
    cache_dir,
    key,
    augmentation=None,
    patch_size=None,
    random_patch=True,
):
    """What the stage-2 data loader iterates: cached latents ('memory', 'disk') or the volumes ('none').

    Args:
        autoencoder: what encodes (an AutoencoderKL, or a :class:`SlidingWindowEncoder` around one).
        augmentation: a :class:`scripts.data.datasets.RandFlipRotated`, or ``None``. With a cache, every symmetry it allows
            is encoded once and each epoch draws one per volume; without, it is applied to the volume before
            encoding.
        patch_size: the latent patch (x, y, z) stage 2 trains on, ``None`` or the whole latent: whole latents.
            Latents larger than it are cropped at each access: at random (the same window of ``z_mu`` and
            ``z_sigma``) or, without ``random_patch``, at their centre, the same every epoch (validation).
    """
    if mode not in CACHE_MODES:
        raise UserError(f"latent_cache: expected one of {', '.join(CACHE_MODES)}, got {mode!r}")
    if mode == "none":  # volumes held in memory, encoded at every step (the baseline the cache is measured against)
        dataset = CacheDataset(
            datalist, Compose([transform] + ([augmentation] if augmentation else [])), progress=False
        )
        if patch_size is not None:
            factor = _downsampling(getattr(autoencoder, "autoencoder", autoencoder))
            whole = tuple(s // factor for s in transform(dict(datalist[0]))["image"].shape[1:])
            if tuple(patch_size) != whole:
                raise UserError(
                    f"latent_cache: 'none' encodes whole grids at every step, but stage 2 trains on latent patches "
                    f"{list(patch_size)} of {list(whole)}; use memory or disk (or latent_patch_size {list(whole)})"
                )
        return dataset
    cache_dir = cache_dir if mode == "disk" else None
    symmetries = augmentation.elements if augmentation is not None else [None]
    items = encode_volumes(autoencoder, datalist, transform, device, batch_size, cache_dir, key, symmetries)
    crop = None
    if patch_size is not None and tuple(patch_size) != tuple(items[0][0]["z_mu"].shape[1:]):
        keys = ["z_mu", "z_sigma"]
        crop = (
            RandPatchd(keys, patch_size)
            if random_patch
            else Compose([CenterSpatialCropd(keys, tuple(patch_size)), EnsureTyped(keys, track_meta=False)])
        )
    return LatentVariants(items, crop)


def sample_latents(batch, autoencoder, device, generator=None, draw="sample"):
    """Latents of a batch, from cached ``z_mu``/``z_sigma`` or encoded from ``image`` on the fly: ``draw`` 'sample'
    draws them from the encoder's posterior N(z_mu, z_sigma²), 'mean' takes its mean ``z_mu``."""
    if "z_mu" in batch:
        z_mu, z_sigma = batch["z_mu"].to(device), batch["z_sigma"].to(device)
    else:
        with torch.no_grad():
            z_mu, z_sigma = autoencoder.encode(batch["image"].to(device))
    if draw == "mean":
        return z_mu.float()
    noise = torch.randn(z_mu.shape, generator=generator, device="cpu" if generator is not None else z_mu.device)
    return z_mu.float() + z_sigma.float() * noise.to(z_mu.device)


def compute_scale_factor(dataset, autoencoder, device, n_batches, batch_size, draw="sample"):
    """1 / std of the encoder's latents (drawn as ``draw`` says, see :func:`sample_latents`) over ``n_batches``
    batches; under DDP each rank takes its own shard and the ranks' factors are averaged."""
    distributed = dist.is_available() and dist.is_initialized()
    sampler = DistributedSampler(dataset, shuffle=False, even_divisible=False) if distributed else None
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler)
    latents = []
    for i, batch in enumerate(loader):
        if i >= n_batches:
            break
        latents.append(sample_latents(batch, autoencoder, device, draw=draw))
    factor = torch.tensor(1.0 / torch.cat(latents).std().item(), dtype=torch.float64, device=device)
    local = factor.item()
    if distributed:
        dist.all_reduce(factor)
        factor /= dist.get_world_size()
    logger.info(f"scale_factor = {factor.item():.6f} (this rank: {local:.6f}, from {len(latents)} batches)")
    return factor.item()


def resolve_scale_factor(scale_factor, resume_from, dataset, autoencoder, device, n_batches, batch_size, draw="sample"):
    """A number from the config wins; a resumed run keeps the value stored in its checkpoint; else compute it."""
    if scale_factor is not None:
        logger.info(f"scale_factor = {float(scale_factor)} (from the config)")
        return float(scale_factor)
    if resume_from:
        stored = load_checkpoint(resume_from, "diffusion", hint="check --resume_from").get("scale_factor")
        if stored is not None:
            logger.info(f"scale_factor = {stored} (from {resume_from})")
            return float(stored)
    return compute_scale_factor(dataset, autoencoder, device, n_batches, batch_size, draw)
