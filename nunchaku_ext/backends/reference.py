"""The reference backend: DESIGN.md §2 written literally in torch. Slow, any device, the spec.

The quantized branch is summed group by group exactly as the kernels do it: each group's dot
product of integer codes is exact (|sum| <= 64*8*8 for INT4, 16*12*12 for NVFP4 codes times two,
both exact in fp32 even under TF32), then scaled by the two group scales and accumulated in fp32.
"""
import torch

from ..numerics import (
    INT4_GROUP,
    NVFP4_GROUP,
    e2m1_to_float,
    quantize_act_int4,
    quantize_act_nvfp4,
    smooth_input,
    unpack_4bit,
)


def _as_rows(x, in_features):
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features in its last dimension, the layer takes {in_features}")
    return x.reshape(-1, in_features)


def _grouped_dot(x_codes, x_scales, w_codes, w_scales, group):
    """Σ_g (x_codes_g · w_codes_gᵀ) · x_scales[:, g] · w_scales[g, :], in fp32.

    x_codes [M, K] and w_codes [N, K] are exact small integers held as fp32; x_scales [M, G],
    w_scales [G, N] fp32."""
    M, K = x_codes.shape
    acc = torch.zeros(M, w_codes.shape[0], dtype=torch.float32, device=x_codes.device)
    for g in range(K // group):
        ks = slice(g * group, (g + 1) * group)
        acc += (x_codes[:, ks] @ w_codes[:, ks].T) * x_scales[:, g, None] * w_scales[g, None, :]
    return acc


def quantized_branch(layer, x2):
    """Q(xs) · Q(R)ᵀ for rows x2 [M, K], fp32 [M, N]."""
    xs = smooth_input(x2, layer.smooth, layer.act_unsigned)
    if layer.precision == "int4":
        x_codes, x_scales = quantize_act_int4(xs, layer.act_unsigned)
        w_codes = unpack_4bit(layer.qweight, signed=True)
        return _grouped_dot(x_codes.float(), x_scales, w_codes.float(), layer.wscales.float(), INT4_GROUP)
    # NVFP4: codes times two are integers in [-12, 12]; the 1/4 goes into the per-tensor alpha, then
    # the per-channel scale.
    x_codes, x_scales = quantize_act_nvfp4(xs)
    w_codes = unpack_4bit(layer.qweight, signed=False)
    acc = _grouped_dot(2 * e2m1_to_float(x_codes), x_scales.float(), 2 * e2m1_to_float(w_codes),
                       layer.wscales.float(), NVFP4_GROUP)
    return acc * (layer.wtscale.float() / 4) * layer.wcscales.float()


def w4a4_linear(layer, x):
    x2 = _as_rows(x, layer.in_features)
    y = quantized_branch(layer, x2)
    if layer.rank:
        y += (x2.float() @ layer.lora_down.float().T) @ layer.lora_up.float().T
    if layer.bias is not None:
        y += layer.bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def w4a16_linear(layer, x):
    x2 = _as_rows(x, layer.in_features)
    y = x2.float() @ layer.dequantize().T
    if layer.bias is not None:
        y += layer.bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def mlp_w4a4(fc1, fc2, x, out=None):
    """fc2(GELU_tanh(fc1(x))), the MLP pair's spec (backends/reference_mlp.py), with an optional
    preallocated output as backends.cuda.mlp_w4a4 takes. This backend has no `mlp_fusable`: it does
    not fuse, and layers.SVDQMLP runs its children (the same numbers) instead of calling this."""
    from . import reference_mlp  # it imports this module

    y = reference_mlp.mlp_w4a4(fc1, fc2, x)
    return y if out is None else out.copy_(y)
