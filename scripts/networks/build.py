"""The bundle's networks: MONAI's AutoencoderKL and DiffusionModelUNet built from their stored settings, and the
forms of them that ``ckpt_export`` turns into TorchScript."""

import warnings
from pathlib import Path
from typing import Optional

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from scripts.data.geometry import as_shape
from scripts.networks.checkpoints import SHIPPED_FILES, state_dict_problem
from scripts.runtime.errors import UserError


def unwrap(network):
    """The module inside a ``DistributedDataParallel`` wrapper (or the network itself)."""
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network


def downsampling(channels):
    """How many voxels of a network's input one voxel of its deepest level spans on each axis: the
    AutoencoderKL's grid voxels per latent voxel, the UNet's latent voxels per bottleneck voxel (one halving
    between consecutive ``channels``)."""
    return 2 ** (len(channels) - 1)


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


class _SettingsChecked:
    """``load_state_dict`` refused in one line when the weights do not fit the settings the network was built from
    (``settings_from``): ``ckpt_export`` reads ``models/`` by default, while the config builds ``network_def``
    from the trained outputs when there are some, so exporting before publishing would fail with a long
    ``size mismatch`` traceback."""

    net_id, key_in_ckpt, settings_from = "", "", None

    def load_state_dict(self, state_dict, strict=True, assign=False):
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as e:
            if self.settings_from is None:
                raise
            source = Path(self.settings_from)
            problem = (
                f"{self.net_id}: the weights ckpt_export loads (--ckpt_file, by default models/model.pt) do not fit "
                f"the network built from the settings of {source} ({state_dict_problem(e)})"
            )
            if source.name in SHIPPED_FILES.values():  # the settings of published weights: other weights were given
                hint = f"pass --ckpt_file {source}, or --model_dir with the training outputs those weights belong to"
            else:
                hint = (
                    f"publish them first: python scripts/weights.py --model_dir {source.parent.parent} --output_dir "
                    f"models --overwrite true, or export them as they are: --ckpt_file {source} --key_in_ckpt "
                    f"{self.key_in_ckpt}"
                )
            raise UserError(f"{problem}; {hint}") from None


def _trace(net, example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(net.eval(), example)


class ExportableUNet(_SettingsChecked, DiffusionModelUNet):
    """The diffusion UNet as ``network_def``: the same parameters (a plain UNet state dict loads as is), and
    ``forward(latents, timesteps=None)``, where ``timesteps`` defaults to 0 (the last denoising step), so the
    network also runs on latents alone, as the Model Zoo's shape check calls it.

    MONAI's networks do not script, so ``torch.jit.script`` (what ``ckpt_export`` calls) gets a trace of it on a
    ``latent_shape`` example, in a scripted shell that keeps ``timesteps`` optional. ``settings_from`` is the
    checkpoint ``unet_args`` come from, named when other weights are loaded into it.
    """

    net_id, key_in_ckpt = "network_def", "unet_ema"

    def __init__(self, unet_args, latent_shape, settings_from=None):
        super().__init__(**unet_args)
        self.latent_shape, self.settings_from = tuple(latent_shape), settings_from

    def forward(self, x, timesteps=None):
        return super().forward(x, _timesteps_or_last(x, timesteps))

    def __prepare_scriptable__(self):
        example = (torch.rand(1, *self.latent_shape), torch.ones(1, dtype=torch.long))
        return _TracedUNet(_trace(self, example))


class ExportableAutoencoder(_SettingsChecked, AutoencoderKL):
    """The autoencoder as ``autoencoder_def``: the same parameters as AutoencoderKL, and ``forward`` is the
    deterministic reconstruction (decode of the encoder mean; AutoencoderKL's own forward draws a random latent,
    which a trace would freeze). Scripted as a trace on a ``voxel_size`` example, like :class:`ExportableUNet`."""

    net_id, key_in_ckpt = "autoencoder_def", "autoencoder"

    def __init__(self, autoencoder_args, voxel_size, settings_from=None):
        super().__init__(**autoencoder_args)
        self.example_shape = (autoencoder_args.get("in_channels", 1), *as_shape(voxel_size))
        self.settings_from = settings_from

    def forward(self, x):
        return self.reconstruct(x)

    def __prepare_scriptable__(self):
        return _TracedAutoencoder(_trace(self, torch.rand(1, *self.example_shape)))
