"""Stage 2's latents: encoded once per volume by the frozen autoencoder, cached, and scaled (the scale factor)."""

import hashlib
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from monai.data import CacheDataset, DataLoader, Dataset, DistributedSampler
from monai.transforms import Compose
from scripts.checkpoint import load_checkpoint, save_checkpoint
from scripts.errors import UserError

logger = logging.getLogger(__name__)
CACHE_MODES = ("memory", "disk", "none")


def encode_volumes(autoencoder, datalist, transform, device, batch_size=2, cache_dir=None, key="", symmetries=(None,)):
    """Encode every volume once per symmetry: ``[[{"z_mu": (C, x, y, z), "z_sigma": ...} per symmetry] per volume]``
    on the CPU, in datalist order.

    ``symmetries`` are :class:`scripts.data.FlipRotate` elements (``None``: the volume as it is); encoding each
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
    which checkpoints restore, so a resumed run draws what an uninterrupted one would)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        variants = self.items[index]
        return variants[int(torch.randint(len(variants), ()))] if len(variants) > 1 else variants[0]


def latent_items(mode, autoencoder, datalist, transform, device, batch_size, cache_dir, key, augmentation=None):
    """What the stage-2 data loader iterates: cached latents ('memory', 'disk') or the volumes ('none').

    ``augmentation`` (a :class:`scripts.data.RandFlipRotated`, or ``None``): with a cache, every symmetry it allows
    is encoded once and each epoch draws one per volume; without, it is applied to the volume before encoding.
    """
    if mode not in CACHE_MODES:
        raise UserError(f"latent_cache: expected one of {', '.join(CACHE_MODES)}, got {mode!r}")
    if mode == "none":  # volumes held in memory, encoded at every step (the baseline the cache is measured against)
        return CacheDataset(datalist, Compose([transform] + ([augmentation] if augmentation else [])), progress=False)
    cache_dir = cache_dir if mode == "disk" else None
    symmetries = augmentation.elements if augmentation is not None else [None]
    return LatentVariants(
        encode_volumes(autoencoder, datalist, transform, device, batch_size, cache_dir, key, symmetries)
    )


def sample_latents(batch, autoencoder, device, generator=None):
    """Latents of a batch: drawn from cached ``z_mu``/``z_sigma``, or encoded from ``image`` on the fly."""
    if "z_mu" in batch:
        z_mu, z_sigma = batch["z_mu"].to(device), batch["z_sigma"].to(device)
    else:
        with torch.no_grad():
            z_mu, z_sigma = autoencoder.encode(batch["image"].to(device))
    noise = torch.randn(z_mu.shape, generator=generator, device="cpu" if generator is not None else z_mu.device)
    return z_mu.float() + z_sigma.float() * noise.to(z_mu.device)


def compute_scale_factor(dataset, autoencoder, device, n_batches, batch_size):
    """1 / std of the encoder's latents over ``n_batches`` batches; under DDP each rank takes its own shard and the
    ranks' factors are averaged."""
    distributed = dist.is_available() and dist.is_initialized()
    sampler = DistributedSampler(dataset, shuffle=False, even_divisible=False) if distributed else None
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler)
    latents = []
    for i, batch in enumerate(loader):
        if i >= n_batches:
            break
        latents.append(sample_latents(batch, autoencoder, device))
    factor = torch.tensor(1.0 / torch.cat(latents).std().item(), dtype=torch.float64, device=device)
    local = factor.item()
    if distributed:
        dist.all_reduce(factor)
        factor /= dist.get_world_size()
    logger.info(f"scale_factor = {factor.item():.6f} (this rank: {local:.6f}, from {len(latents)} batches)")
    return factor.item()


def resolve_scale_factor(scale_factor, resume_from, dataset, autoencoder, device, n_batches, batch_size):
    """A number from the config wins; a resumed run keeps the value stored in its checkpoint; else compute it."""
    if scale_factor is not None:
        logger.info(f"scale_factor = {float(scale_factor)} (from the config)")
        return float(scale_factor)
    if resume_from:
        stored = load_checkpoint(resume_from, "diffusion", hint="check --resume_from").get("scale_factor")
        if stored is not None:
            logger.info(f"scale_factor = {stored} (from {resume_from})")
            return float(stored)
    return compute_scale_factor(dataset, autoencoder, device, n_batches, batch_size)
