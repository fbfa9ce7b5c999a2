"""The 'cuda' backend: SVDQuant W4A4 INT4 layers on our own kernels (csrc/, built just in time).

Forward of a W4A4 layer, two launches (csrc/w4a4_int8.cu documents kernels and layouts):
  1. quantize_act_lora_down: x -> 4-bit codes in the GEMM's fragment layout, fp32 group scales,
     and lora_act = x . lora_downᵀ (fp32), in one read of x;
  2. w4a4_gemm: INT8 tensor-core GEMM over the 4-bit codes with the group rescale, the low-rank up
     projection and the bias fused into it; output in x.dtype.

The layer's buffers stay in the file layout (the spec). This backend keeps a repacked copy per
layer and device, made on first use with torch ops on the device and remade only when a source
buffer changes (a new tensor, or an in-place write, which bumps the tensor's version counter).
"""
import logging
from dataclasses import dataclass

import torch

from .. import cuda_build
from ..layers import BACKEND_STATE_ATTR
from ..numerics import INT4_GROUP, unpack_4bit

log = logging.getLogger(__name__)

BLOCK_M = 128  # the GEMM's block tile (csrc/w4a4_int8.h kGemmBlockM/N); padding of M and N
BLOCK_N = 128
_CACHE_ATTR = BACKEND_STATE_ATTR  # dropped by the layer when its buffers move (layers.py)
_warned = set()


def extension():
    """The compiled kernels for the current GPU (builds on first call); CudaBuildError if impossible."""
    return cuda_build.load()


def available() -> tuple:
    """(True, "") if the kernels can run here, else (False, reason). Builds them on first call."""
    try:
        extension()
        return True, ""
    except cuda_build.CudaBuildError as e:
        return False, str(e)


# ------------------------------------------------------------------------------------------------
# Weight repack: file layout -> fragment layout (once per layer and device)


def _round_up(v, m):
    return (v + m - 1) // m * m


def pack_weight_fragments(qweight: torch.Tensor, n_pad: int) -> torch.Tensor:
    """File-layout qweight uint8 [N, K/2] (low nibble = even k) -> int32 [N_pad/16, K/64, 32, 4].

    For column pair p, group g and lane = 4*gid + tid, word 2*t + v holds, for b = 0..3,
      nibble 2b   = W[16p + 8t + gid, 64g + 32v      + 4tid + b]   (mma B register b0)
      nibble 2b+1 = W[16p + 8t + gid, 64g + 32v + 16 + 4tid + b]   (mma B register b1)
    which is csrc/w4a4_int8.cu's weight layout. Padded columns are zero codes."""
    N, half_k = qweight.shape
    K = half_k * 2
    G = K // INT4_GROUP
    nib = unpack_4bit(qweight, signed=False)  # uint8 [N, K], raw nibbles 0..15
    if n_pad > N:
        nib = torch.cat([nib, nib.new_zeros(n_pad - N, K)])
    # n = 16p + 8t + gid ; k = 64g + 32v + 16half + 4tid + b
    nib = nib.view(n_pad // 16, 2, 8, G, 2, 2, 4, 4)  # p, t, gid, g, v, half, tid, b
    nib = nib.permute(0, 3, 2, 6, 1, 4, 7, 5).contiguous()  # p, g, gid, tid, t, v, b, half
    packed = nib[..., 0] | (nib[..., 1] << 4)  # p, g, gid, tid, t, v, b : one byte per b
    return packed.contiguous().view(torch.int32).reshape(n_pad // 16, G, 32, 4)


def unpack_act_fragments(act_packed: torch.Tensor, M: int, unsigned: bool) -> torch.Tensor:
    """Inverse of the activation layout written by the quantize kernel: int32 [M_pad/16, K/64, 32, 4]
    -> codes int8 [M, K] (the layout numerics.quantize_act_int4 returns). For tests.

    For m16 tile mt, group g, lane = 4*gid + tid, word j, byte b:
      low nibble = code[16mt + gid, 64g + 16j + 4tid + b], high nibble = code[16mt + 8 + gid, same k]."""
    MT, G = act_packed.shape[:2]
    raw = act_packed.contiguous().view(torch.uint8).view(MT, G, 8, 4, 4, 4)  # mt, g, gid, tid, j, b
    nib = torch.stack((raw & 0xF, raw >> 4), dim=-1)  # ..., row half
    codes = nib.permute(0, 6, 2, 1, 4, 3, 5).reshape(MT * 16, G * INT4_GROUP)[:M]
    codes = codes.to(torch.int8)
    if not unsigned:
        codes = codes - (codes >= 8).to(torch.int8) * 16
    return codes


@dataclass
class Prepared:
    """One layer's operands in the kernels' layouts on one device."""

    n_pad: int
    rank: int
    wgt_packed: torch.Tensor  # int32 [N_pad/16, K/64, 32, 4]
    wgt_scales: torch.Tensor  # fp32 [K/64, N_pad]
    bias: torch.Tensor        # fp32 [N_pad]
    smooth: torch.Tensor      # fp32 [K]
    lora_down: torch.Tensor   # fp32 [R, K]
    lora_up: torch.Tensor     # fp32 [N_pad, R16]


def _fingerprint(*tensors):
    return tuple(None if t is None else (t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device)
                 for t in tensors)


def _prepare_base(layer, device):
    N = layer.out_features
    n_pad = _round_up(N, BLOCK_N)
    qweight = layer.qweight.to(device)
    wscales = layer.wscales.to(device).float()
    wgt_scales = torch.zeros(wscales.shape[0], n_pad, dtype=torch.float32, device=device)
    wgt_scales[:, :N] = wscales
    bias = torch.zeros(n_pad, dtype=torch.float32, device=device)
    if layer.bias is not None:
        bias[:N] = layer.bias.to(device).float()
    smooth = layer.smooth.to(device).float().contiguous()
    return dict(n_pad=n_pad, wgt_packed=pack_weight_fragments(qweight, n_pad), wgt_scales=wgt_scales, bias=bias,
                smooth=smooth)


def _prepare_lora(layer, device, n_pad):
    N, R = layer.out_features, layer.rank
    r16 = _round_up(R, 16)
    lora_down = layer.lora_down.to(device).float().contiguous()
    lora_up = torch.zeros(n_pad, r16, dtype=torch.float32, device=device)
    lora_up[:N, :R] = layer.lora_up.to(device).float()
    return dict(rank=R, lora_down=lora_down, lora_up=lora_up)


def prepare(layer, device) -> Prepared:
    """The layer's repacked operands on `device`, made once and reused while its buffers are unchanged.
    The low-rank factors are keyed separately, so absorbing a LoRA repacks only them."""
    device = torch.device(device)
    cache = layer.__dict__.setdefault(_CACHE_ATTR, {})
    # Keep one device's copy at a time: a layer moved to another GPU should not pin the old copy.
    for other in [d for d in cache if d != device]:
        del cache[other]
    entry = cache.setdefault(device, {})
    base_key = _fingerprint(layer.qweight, layer.wscales, layer.bias, layer.smooth)
    if entry.get("base_key") != base_key:
        entry["base"] = _prepare_base(layer, device)
        entry["base_key"] = base_key
        entry.pop("lora_key", None)  # n_pad could change with the layer
    lora_key = _fingerprint(layer.lora_down, layer.lora_up)
    if entry.get("lora_key") != lora_key:
        entry["lora"] = _prepare_lora(layer, device, entry["base"]["n_pad"])
        entry["lora_key"] = lora_key
    return Prepared(**entry["base"], **entry["lora"])


def release(layer):
    """Drop this layer's repacked copies (e.g. before offloading the model)."""
    layer.__dict__.pop(_CACHE_ATTR, None)


# ------------------------------------------------------------------------------------------------
# Forward


def _check_input(layer, x):
    if layer.precision != "int4":
        raise NotImplementedError(f"the 'cuda' backend runs int4 layers only so far; this layer is "
                                  f"{layer.precision!r} (use the 'reference' backend for it)")
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"input has {x.shape[-1]} features in its last dimension, the layer takes {layer.in_features}")
    if not x.is_cuda:
        raise ValueError(f"the 'cuda' backend needs the input on a CUDA device, got {x.device}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"the 'cuda' backend takes bfloat16 or float16 input, got {x.dtype}")


def _rows(x, K):
    x2 = x.reshape(-1, K)
    # The quantize kernel reads 4 elements (8 bytes) at a time and takes any row stride divisible by 4.
    if x2.stride(-1) != 1 or x2.stride(0) % 4 or x2.data_ptr() % 8:
        x2 = x2.contiguous()
    return x2


_POISON_WORD = -0x77777778  # int32 0x88888888: every nibble 8, a code the signed quantizer never writes


def quantize_act(layer, x, poison=False):
    """Kernel A alone, unpacked to the spec's layouts (for tests): (codes int8 [M, K], scales fp32
    [M, K/64], lora_act fp32 [M, rank], raw kernel outputs). poison=True pre-fills the outputs with
    NaN / nibble-8 words so that an element the kernel does not write cannot pass."""
    _check_input(layer, x)
    x2 = _rows(x, layer.in_features)
    prep = prepare(layer, x.device)
    M, K = x2.shape
    outs = {}
    if poison:
        m_pad, G, r16 = _round_up(M, BLOCK_M), K // INT4_GROUP, _round_up(prep.rank, 16)
        f32 = dict(dtype=torch.float32, device=x.device)
        outs = dict(act_packed_out=torch.full((m_pad // 16, G, 32, 4), _POISON_WORD, dtype=torch.int32, device=x.device),
                    act_scales_out=torch.full((G, m_pad), float("nan"), **f32),
                    lora_act_out=torch.full((m_pad, r16), float("nan"), **f32))
    with torch.cuda.device(x.device):
        act, scales, lora_act = extension().quantize_act_lora_down(x2, prep.smooth, prep.lora_down, layer.act_unsigned,
                                                                   **outs)
    return (unpack_act_fragments(act, M, layer.act_unsigned), scales.T[:M].contiguous(),
            lora_act[:M, :prep.rank].contiguous(), (act, scales, lora_act))


def forward(layer, x, out=None):
    """w4a4_linear with an optional preallocated output (contiguous, x.shape[:-1] + (N,), x.dtype)."""
    _check_input(layer, x)
    K, N = layer.in_features, layer.out_features
    x2 = _rows(x, K)
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*x.shape[:-1], N)
    with torch.cuda.device(x.device):
        ext = extension()
        prep = prepare(layer, x.device)
        act, act_scales, lora_act = ext.quantize_act_lora_down(x2, prep.smooth, prep.lora_down, layer.act_unsigned)
        y = ext.w4a4_gemm(act, act_scales, lora_act, prep.wgt_packed, prep.wgt_scales, prep.lora_up, prep.bias,
                          M, N, layer.act_unsigned, x.dtype, None if out is None else out.view(M, N))
    return y.reshape(*x.shape[:-1], N)


def w4a4_linear(layer, x):
    return forward(layer, x)


def w4a16_linear(layer, x):
    # The W4A16 kernel (modulation linears) is the next milestone of issue 3; say so once rather than
    # switching silently.
    if "w4a16" not in _warned:
        _warned.add("w4a16")
        log.warning("cuda backend: no W4A16 kernel yet; the modulation linears run on the reference backend")
    from . import reference

    return reference.w4a16_linear(layer, x)
