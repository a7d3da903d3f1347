"""The bundle's networks: MONAI's AutoencoderKL and DiffusionModelUNet built from their stored settings, and the
forms of them that ``ckpt_export`` turns into TorchScript."""

import warnings
from typing import Optional

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from scripts.geometry import as_shape


def unwrap(network):
    """The module inside a ``DistributedDataParallel`` wrapper (or the network itself)."""
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network


def build_autoencoder(args):
    return AutoencoderKL(**args)


def build_unet(args):
    return DiffusionModelUNet(**args)


def _timesteps_or_last(x: torch.Tensor, timesteps: Optional[torch.Tensor]) -> torch.Tensor:
    """``timesteps``, or 0 (the last denoising step) for every latent of ``x`` when none are given."""
    return torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if timesteps is None else timesteps


class _TracedUNet(torch.nn.Module):
    """A scriptable shell around a traced UNet: TorchScript keeps ``timesteps`` optional."""

    def __init__(self, traced):
        super().__init__()
        self.net = traced

    def forward(self, x: torch.Tensor, timesteps: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.net(x, _timesteps_or_last(x, timesteps))


class _TracedAutoencoder(torch.nn.Module):
    """A scriptable shell around a traced autoencoder (``torch.jit.script`` does not take a trace itself)."""

    def __init__(self, traced):
        super().__init__()
        self.net = traced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _trace(net, example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(net.eval(), example)


class ExportableUNet(DiffusionModelUNet):
    """The diffusion UNet as ``network_def``: the same parameters (a plain UNet state dict loads as is), and
    ``forward(latents, timesteps=None)``, where ``timesteps`` defaults to 0 (the last denoising step), so the
    network also runs on latents alone, as the Model Zoo's shape check calls it.

    MONAI's networks do not script, so ``torch.jit.script`` (what ``ckpt_export`` calls) gets a trace of it on a
    ``latent_shape`` example, in a scripted shell that keeps ``timesteps`` optional.
    """

    def __init__(self, unet_args, latent_shape):
        super().__init__(**unet_args)
        self.latent_shape = tuple(latent_shape)

    def forward(self, x, timesteps=None):
        return super().forward(x, _timesteps_or_last(x, timesteps))

    def __prepare_scriptable__(self):
        example = (torch.rand(1, *self.latent_shape), torch.ones(1, dtype=torch.long))
        return _TracedUNet(_trace(self, example))


class ExportableAutoencoder(AutoencoderKL):
    """The autoencoder as ``autoencoder_def``: the same parameters as AutoencoderKL, and ``forward`` is the
    deterministic reconstruction (decode of the encoder mean; AutoencoderKL's own forward draws a random latent,
    which a trace would freeze). Scripted as a trace on a ``voxel_size`` example, like :class:`ExportableUNet`."""

    def __init__(self, autoencoder_args, voxel_size):
        super().__init__(**autoencoder_args)
        self.example_shape = (autoencoder_args.get("in_channels", 1), *as_shape(voxel_size))

    def forward(self, x):
        return self.reconstruct(x)

    def __prepare_scriptable__(self):
        return _TracedAutoencoder(_trace(self, torch.rand(1, *self.example_shape)))
