"""The 'cuda' backend's W4A16 linear (adaLN modulation layers): csrc/w4a16_gemv.cu.

y = x · (code · scale + zero)ᵀ + bias, computed as Σ_g (x_g · codes_g)·scale_g + (Σ_{k∈g} x_k)·zero_g
on the 16-bit tensor cores with fp32 accumulation. The kernel reads the layer's own buffers in the
file layout, in place — qweight uint8 [N, K/2], wscales / wzeros [K/64, N], bias [N] — so these
layers cost their file size in VRAM and nothing else: no repacked copy, no per-layer backend state.

Dtypes: x may be bfloat16 or float16 independently of the layer's scale dtype (bfloat16 or float16,
wscales and wzeros alike): the kernel is templated on both, nothing is cast. Only the bias is cast,
per call, when its dtype differs from the scales' (it never does for a layer built by this package).

The buffers are used as they are whenever they can be: on x's device, contiguous, qweight 8-byte
aligned (always so for a buffer torch allocated). Otherwise (a layer left on another device, a view
installed by hand) the call works on a temporary copy that lives for this call only, never kept.

Turing (sm_75) has no m16n8k16 16-bit MMA (and no bf16 MMA): there the W4A16 layers run on the
reference backend, with a one-time warning that says so.
"""
import logging

import torch

from .. import cuda_build
from .cuda import operand

log = logging.getLogger(__name__)

_SCALE_DTYPES = (torch.bfloat16, torch.float16)


def operands(layer, device):
    """(qweight, wscales, wzeros, bias or None) for the kernel on `device`: the layer's buffers."""
    if layer.wscales.dtype != layer.wzeros.dtype or layer.wscales.dtype not in _SCALE_DTYPES:
        raise TypeError(f"W4A16 scales and zeros must both be bfloat16 or float16, got {layer.wscales.dtype} "
                        f"and {layer.wzeros.dtype}")
    dtype = layer.wscales.dtype
    return (operand(layer.qweight, device), operand(layer.wscales, device), operand(layer.wzeros, device),
            operand(layer.bias, device, dtype))


def _rows(x, K):
    x2 = x.reshape(-1, K)
    # The kernel reads x 16 bytes at a time: unit column stride, row stride a multiple of 8 elements.
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:
        x2 = x2.contiguous()
    return x2


def forward(ext, layer, x, out=None):
    """W4A16 linear on the kernel; `out` optionally a preallocated contiguous x.shape[:-1] + (N,)."""
    K, N = layer.in_features, layer.out_features
    if x.shape[-1] != K:
        raise ValueError(f"input has {x.shape[-1]} features in its last dimension, the layer takes {K}")
    if not x.is_cuda:
        raise ValueError(f"the 'cuda' backend needs the input on a CUDA device, got {x.device}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"the 'cuda' backend takes bfloat16 or float16 input, got {x.dtype}")
    if tuple(int(v) for v in cuda_build.device_arch(x.device).split(".")) < (8, 0):
        return _reference_on_turing(layer, x, out)
    x2 = _rows(x, K)
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*x.shape[:-1], N)
    with torch.cuda.device(x.device):
        qweight, wscales, wzeros, bias = operands(layer, x.device)
        y = ext.w4a16_gemv(x2, qweight, wscales, wzeros, bias, None if out is None else out.view(M, N))
    return y.reshape(*x.shape[:-1], N)


_warned_turing = []


def _reference_on_turing(layer, x, out):
    from . import reference

    if not _warned_turing:
        _warned_turing.append(True)
        log.warning("cuda backend: the W4A16 kernel needs sm_80 or newer (m16n8k16 MMA); on this sm_75 GPU the "
                    "modulation linears run on the reference backend")
    y = reference.w4a16_linear(layer, x)
    if out is None:
        return y
    out.copy_(y)
    return out
