"""Losses of the autoencoder stage. Every weight is an argument, set in the config."""

from pathlib import Path

import torch
from scripts.runtime.errors import UserError
from torch import nn


class ReconstructionLoss(nn.Module):
    """Weighted sum of L1, MSE, foreground-weighted L1 and soft Dice of the foreground.

    SMLM grids are sparse (under 1 % foreground), so a plain L1 learns "all empty"; weighting foreground voxels
    (``fg_weight`` ≈ 20–100) and adding Dice is what works.

    Args:
        l1_weight: weight of the mean absolute error.
        mse_weight: weight of the mean squared error.
        fg_l1_weight: weight of the L1 where voxels with target > ``fg_threshold`` count ``fg_weight`` times.
        fg_weight: how much more a foreground voxel counts in the weighted L1.
        fg_threshold: target value above which a voxel is foreground (grids are scaled to [0, 1]).
        dice_weight: weight of 1 - soft Dice between the clamped prediction and the foreground mask.
    """

    def __init__(
        self, l1_weight=0.0, mse_weight=0.0, fg_l1_weight=1.0, fg_weight=50.0, fg_threshold=0.1, dice_weight=0.0
    ):
        super().__init__()
        self.l1_weight, self.mse_weight, self.dice_weight = l1_weight, mse_weight, dice_weight
        self.fg_l1_weight, self.fg_weight, self.fg_threshold = fg_l1_weight, fg_weight, fg_threshold

    def forward(self, pred, target):
        loss = pred.new_zeros(())
        error = (pred - target).abs()
        if self.l1_weight:
            loss = loss + self.l1_weight * error.mean()
        if self.mse_weight:
            loss = loss + self.mse_weight * (error**2).mean()
        foreground = (target > self.fg_threshold).to(pred.dtype)
        if self.fg_l1_weight:
            weights = 1.0 + (self.fg_weight - 1.0) * foreground
            loss = loss + self.fg_l1_weight * (weights * error).mean()
        if self.dice_weight:
            p, dims = pred.clamp(0, 1), tuple(range(1, pred.ndim))
            dice = (2 * (p * foreground).sum(dims) + 1.0) / (p.sum(dims) + foreground.sum(dims) + 1.0)
            loss = loss + self.dice_weight * (1 - dice).mean()
        return loss


def kl_loss(z_mu, z_sigma):
    """KL divergence of N(z_mu, z_sigma²) from N(0, 1), summed over the latent and averaged over the batch."""
    dims = tuple(range(1, z_mu.ndim))
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1).sum(dims)
    return kl.mean()


def perceptual_loss(weight, weights_path):
    """The perceptual loss on a local weights file, or ``None`` (off) when no file is given or the weight is 0.

    MONAI's perceptual networks download their weights unless given a file; nothing is downloaded here, so a
    missing file or a missing torchvision is an error at start-up.
    """
    if not weight or not weights_path:
        return None
    if not Path(weights_path).is_file():
        raise UserError(f"{weights_path}: perceptual_weights_path does not exist (the weights are never downloaded)")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise UserError("perceptual loss: needs torchvision (pip install torchvision)") from None
    from monai.losses import PerceptualLoss

    return PerceptualLoss(
        spatial_dims=3, network_type="resnet50", is_fake_3d=True, pretrained=True, pretrained_path=str(weights_path)
    )
