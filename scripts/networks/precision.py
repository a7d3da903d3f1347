"""Mixed precision by device: fp16 autocast on CUDA, bf16 on CPUs that compute it natively, full precision
elsewhere (MONAI's own ``amp=True`` only knows CUDA)."""

import contextlib

import torch


def cpu_has_bf16():
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast_dtype(device, amp, cpu_bf16=True):
    """The autocast dtype for ``device``, or ``None`` when mixed precision is off or not worth it there.

    ``cpu_bf16=False`` keeps a CPU in fp32: the diffusion UNet's deepest levels (2×2×1 voxels) got NaN weight
    gradients from the bf16 conv3d backward of torch 2.13's CPU kernels within 5–20 steps, while the same
    gradient recomputed by ``torch.nn.grad.conv3d_weight`` was finite (see docs/README.md).
    """
    device = torch.device(device)
    if not amp:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_bf16 and cpu_has_bf16():
        return torch.bfloat16
    return None


def autocast_context(device, dtype):
    """Autocast to ``dtype`` on ``device``'s type, or a no-op context when ``dtype`` is ``None``."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype=dtype)
