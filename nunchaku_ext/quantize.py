"""A minimal SVDQuant quantizer: dense weight (+ optional smoothing) -> quantized layer.

Low-rank branch by truncated SVD of the smoothed weight, round-to-nearest residual. Calibration
and the smoothing search are not here; pass `smooth` if you have one.
"""
import torch

from .layers import SVDQW4A4Linear, W4A16Linear
from .numerics import (
    UNSIGNED_SHIFT,
    pack_4bit,
    quantize_int4_symmetric,
    quantize_weight_nvfp4,
    quantize_weight_w4a16,
)


def _check_weight(weight, bias):
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


@torch.no_grad()
def quantize_w4a4(weight, bias=None, rank=32, *, precision="int4", smooth=None, act_unsigned=False,
                  dtype=torch.bfloat16) -> SVDQW4A4Linear:
    """weight [N, K], bias [N] or None, smooth [K] (positive; the input is divided by it)."""
    _check_weight(weight, bias)
    N, K = weight.shape
    if not 0 <= rank <= min(N, K):
        raise ValueError(f"rank must be in [0, {min(N, K)}] for a {N}x{K} weight, got {rank}")
    device = weight.device
    w = weight.double()
    smooth = torch.ones(K, dtype=dtype, device=device) if smooth is None else smooth.to(device, dtype)
    if smooth.shape != (K,) or not bool((smooth > 0).all()):
        raise ValueError(f"smooth must be positive with shape ({K},)")
    layer = SVDQW4A4Linear(K, N, rank, bias=bias is not None or act_unsigned, precision=precision,
                           act_unsigned=act_unsigned, dtype=dtype, device=device)

    smoothed = w * smooth.double()  # x/smooth · (W·smooth)ᵀ = x · Wᵀ
    u, s, vh = torch.linalg.svd(smoothed, full_matrices=False)
    root = s[:rank].sqrt()
    lora_up = (u[:, :rank] * root).to(dtype)
    lora_down = (root[:, None] * vh[:rank] / smooth.double()).to(dtype)
    # The residual is taken against the ROUNDED factors, so quantization absorbs their rounding error.
    residual = smoothed - lora_up.double() @ (lora_down.double() * smooth.double())

    if precision == "int4":
        codes, scales = quantize_int4_symmetric(residual.float(), scale_dtype=dtype)
        layer.wscales.copy_(scales.T)
    else:  # nvfp4 (the layer's constructor has checked the precision)
        codes, scales, alpha = quantize_weight_nvfp4(residual.float())
        layer.wscales.copy_(scales.T)
        layer.wtscale.copy_(alpha)
        layer.wcscales.fill_(1.0)
    layer.qweight.copy_(pack_4bit(codes))
    layer.smooth.copy_(smooth)
    layer.lora_down.copy_(lora_down)
    layer.lora_up.copy_(lora_up)
    if layer.bias is not None:
        b = torch.zeros(N, dtype=torch.float64, device=device) if bias is None else bias.double()
        if act_unsigned:
            # The quantized branch sees (x + shift) / smooth: remove shift · Σ_k Q(R)[n, k] / smooth[k].
            b = b - UNSIGNED_SHIFT * (layer.dequantized_residual().double() / smooth.double()).sum(dim=1)
        layer.bias.copy_(b)
    return layer


@torch.no_grad()
def quantize_w4a16(weight, bias=None, *, dtype=torch.bfloat16) -> W4A16Linear:
    """weight [N, K], bias [N] or None -> weight-only INT4 layer (group 64, scale and zero)."""
    _check_weight(weight, bias)
    N, K = weight.shape
    layer = W4A16Linear(K, N, bias=bias is not None, dtype=dtype, device=weight.device)
    codes, scales, zeros = quantize_weight_w4a16(weight, dtype)
    layer.qweight.copy_(pack_4bit(codes))
    layer.wscales.copy_(scales.T)
    layer.wzeros.copy_(zeros.T)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer
