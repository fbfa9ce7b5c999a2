"""The 'cuda' backend's W4A16 linear (adaLN modulation layers): csrc/w4a16_gemv.cu.

y = x · (code · scale + zero)ᵀ + bias, computed as Σ_g (x_g · codes_g)·scale_g + (Σ_{k∈g} x_k)·zero_g
on the 16-bit tensor cores with fp32 accumulation; the 4-bit weights are read once, 16 bytes at a
time. The layer's buffers stay in the file layout; the kernel's repacked copy is made on the device
the first time the layer runs there and remade only when a source buffer changes.

Turing (sm_75) has no m16n8k16 16-bit MMA (and no bf16 MMA): there the W4A16 layers run on the
reference backend, with a one-time warning that says so.
"""
import logging

import torch

from .. import cuda_build
from ..numerics import W4A16_GROUP, unpack_4bit
from .cuda import _CACHE_ATTR, _Sources, _round_up

log = logging.getLogger(__name__)

TILE = 16     # rows of one MMA A tile (csrc/w4a16_gemv.cu)
BLOCK_N = 32  # output features per block (csrc/w4a16_gemv.h kW4A16BlockN); padding of N


def pack_weight(qweight: torch.Tensor, n_pad: int) -> torch.Tensor:
    """File-layout qweight uint8 [N, K/2] (unsigned codes, low nibble = even k) -> int32
    [N_pad/16, K/64, 32, 4], csrc/w4a16_gemv.cu's layout: for tile T, group g, lane = 4*gid + tid,
    word j holds at bit 4r + 16q (r = 0..3, q = 0, 1)
        code[16T + gid + 8*(r & 1), 64g + 16tid + 4j + 2*(r >> 1) + q].
    Padded rows are zero codes."""
    N, half_k = qweight.shape
    K = 2 * half_k
    G = K // W4A16_GROUP
    nib = unpack_4bit(qweight, signed=False)
    if n_pad > N:
        nib = torch.cat([nib, nib.new_zeros(n_pad - N, K)])
    # n = 16T + 8rh + gid ; k = 64g + 16tid + 4j + 2half + q ; nibble index within word j = 4q + 2half + rh
    nib = nib.view(n_pad // TILE, 2, 8, G, 4, 4, 2, 2)  # T, rh, gid, g, tid, j, half, q
    nib = nib.permute(0, 3, 2, 4, 5, 7, 6, 1)  # T, g, gid, tid, j, q, half, rh
    packed = nib[..., 0] | (nib[..., 1] << 4)  # one byte per (q, half): byte 2q + half of word j
    return packed.reshape(n_pad // TILE, G, 32, 4, 4).contiguous().view(torch.int32).squeeze(-1)


def pack_scale_zero(wscales: torch.Tensor, wzeros: torch.Tensor, n_pad: int) -> torch.Tensor:
    """wscales, wzeros [K/64, N] (16-bit) -> int32 [N_pad/16, K/64, 8, 2]: element [T, g, gid, h] is
    the 16-bit pair (scale, zero) of row 16T + gid + 8h, scale in the low half. Padded rows are 0."""
    G, N = wscales.shape
    pairs = torch.stack((wscales.T, wzeros.T), dim=-1)  # [N, G, 2]
    if n_pad > N:
        pairs = torch.cat([pairs, pairs.new_zeros(n_pad - N, G, 2)])
    pairs = pairs.view(n_pad // TILE, 2, 8, G, 2).permute(0, 3, 2, 1, 4)  # T, g, gid, h, (scale, zero)
    return pairs.contiguous().view(torch.int32).reshape(n_pad // TILE, G, 8, 2)


def prepare(layer, device):
    """(wgt_packed, scale_zero, bias fp32 [N_pad]) on `device`, kept in the layer's backend state
    (dropped by the layer when its buffers move) and remade when qweight/wscales/wzeros or bias change."""
    if layer.wscales.dtype != layer.wzeros.dtype or layer.wscales.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"W4A16 scales and zeros must both be bfloat16 or float16, got {layer.wscales.dtype} "
                        f"and {layer.wzeros.dtype}")
    device = torch.device(device)
    cache = layer.__dict__.setdefault(_CACHE_ATTR, {})
    for other in [d for d in cache if d != device]:  # one device's copy at a time
        del cache[other]
    entry = cache.setdefault(device, {})
    N = layer.out_features
    n_pad = _round_up(N, BLOCK_N)
    weight_key = _Sources(layer.qweight, layer.wscales, layer.wzeros)
    if entry.get("weight_key") != weight_key:
        entry["weights"] = (pack_weight(layer.qweight.to(device), n_pad),
                            pack_scale_zero(layer.wscales.to(device), layer.wzeros.to(device), n_pad))
        entry["weight_key"] = weight_key
    bias_key = _Sources(layer.bias)
    if entry.get("bias_key") != bias_key:
        bias = torch.zeros(n_pad, dtype=torch.float32, device=device)
        if layer.bias is not None:
            bias[:N] = layer.bias.to(device).float()
        entry["bias"], entry["bias_key"] = bias, bias_key
    return (*entry["weights"], entry["bias"])


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
        wgt, scale_zero, bias = prepare(layer, x.device)
        y = ext.w4a16_gemv(x2, wgt, scale_zero, layer.wscales.dtype, bias, N,
                           None if out is None else out.view(M, N))
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
