"""Check both trained networks against ``configs/metadata.json``, through encode → latent → UNet → decode.

MONAI's ``verify_net_in_out`` (what the Model Zoo runs) checks each network on its own with random input; this
script checks the chain, where the UNet's input is the autoencoder's latent of a real-sized grid::

    python scripts/verify_networks.py [--model_dir outputs] [--meta_file configs/metadata.json]
"""

import json
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from scripts.runtime.command_line import main  # noqa: E402
from scripts.runtime.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _fits(pattern, size):
    """Whether ``size`` fits a metadata spatial entry: an int, or a string like ``"4*n"`` (a multiple of 4)."""
    if isinstance(pattern, int):
        return size == pattern
    match = re.fullmatch(r"\s*(\d+)\s*\*\s*n\s*", str(pattern))
    return bool(match) and size % int(match.group(1)) == 0


def _check(what, fmt, tensor):
    channels, spatial = tensor.shape[1], tuple(tensor.shape[2:])
    if channels != fmt["num_channels"]:
        raise UserError(f"metadata: {what} has {channels} channels, the metadata says {fmt['num_channels']}")
    if len(spatial) != len(fmt["spatial_shape"]) or not all(map(_fits, fmt["spatial_shape"], spatial)):
        raise UserError(f"metadata: {what} has spatial shape {list(spatial)}, not {fmt['spatial_shape']}")
    return f"{what}: {tuple(tensor.shape)} ok"


def verify_networks(model_dir="outputs", meta_file="configs/metadata.json", batch=2):
    """Build both networks from their checkpoints in ``model_dir`` and check every shape the metadata states."""
    from monai.bundle import ConfigParser

    meta = json.loads(Path(meta_file).read_text())
    parser = ConfigParser()
    parser.read_config(ROOT / "configs" / "inference.json")
    parser.update({"model_dir": str(model_dir), "device": "$torch.device('cpu')"})
    autoencoder, unet = parser.get_parsed_content("autoencoder"), parser.get_parsed_content("unet")
    ckpt = parser.get_parsed_content("diffusion_checkpoint")
    ae_fmt, net_fmt = meta["autoencoder_data_format"], meta["network_data_format"]
    image = torch.rand(batch, ae_fmt["inputs"]["image"]["num_channels"], *ckpt["voxel_size"])
    timesteps = torch.randint(0, ckpt["scheduler"]["num_train_timesteps"], (batch,))
    lines = [_check("autoencoder input", ae_fmt["inputs"]["image"], image)]
    with torch.no_grad():
        lines.append(_check("autoencoder output", ae_fmt["outputs"]["pred"], autoencoder.reconstruct(image)))
        latent = autoencoder.encode(image)[0]
        if tuple(latent.shape[1:]) != tuple(ckpt["latent_shape"]):
            raise UserError(
                f"metadata: latent {tuple(latent.shape[1:])} differs from the checkpoint's "
                f"{tuple(ckpt['latent_shape'])}"
            )
        lines.append(_check("diffusion input", net_fmt["inputs"]["image"], latent))
        lines.append(_check("diffusion output", net_fmt["outputs"]["pred"], unet(latent, timesteps=timesteps)))
        decoded = autoencoder.decode(latent)
        if decoded.shape != image.shape:
            raise UserError(
                f"decode: latent {tuple(latent.shape)} decodes to {tuple(decoded.shape)}, not {tuple(image.shape)}"
            )
        lines.append(f"decode: {tuple(latent.shape)} -> {tuple(decoded.shape)} ok")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main(verify_networks)
