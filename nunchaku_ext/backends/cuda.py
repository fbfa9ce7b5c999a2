"""The 'cuda' backend: SVDQuant W4A4 INT4 layers on our own kernels (csrc/, built just in time).

Forward of a W4A4 layer, two launches (csrc/w4a4_int8.cu documents kernels and layouts):
  1. quantize_act_lora_down: x -> 4-bit codes in the GEMM's fragment layout, fp32 group scales,
     and lora_act = x . lora_downᵀ (fp32), in one read of x;
  2. w4a4_gemm: integer tensor-core GEMM over the 4-bit codes with the group rescale, the low-rank up
     projection and the bias fused into it; output in x.dtype.

The GEMM's MMA instruction is picked per GPU (`mma_path`): native s4 `m8n8k32` on sm_75, native s4
`m16n8k64` on sm_80/86/89, INT8 `m16n8k32` on the codes on sm_90/sm_120 (their s4 MMA is emulated).
All give the same outputs; the path fixes the packed layout of the codes. $SVDQ_MMA_PATH forces one
(the tests run the consumer-GPU paths on a Hopper GPU that way). NVFP4 layers take their own path
(`nvfp4_mma_path`): on sm_120 the block-scaled FP4 MMA `m16n8k64 kind::mxf4nvf4` (csrc/w4a4_nvfp4_bs.cuh),
on sm_80..sm_90 E2M1 codes x 2 as int8, INT8 `m16n8k16` per 16-group (csrc/w4a4_nvfp4.cuh).

The layer's buffers stay in the file layout (the spec). This backend keeps a repacked copy per
layer and device, made on first use with torch ops on the device and remade only when a source
buffer changes (a new tensor, or an in-place write, which bumps the tensor's version counter).

W4A16 layers (the modulation linears) run on their own kernel: backends/cuda_w4a16.py.

An MLP pair fc1 -> GELU(tanh) -> fc2 (`mlp_w4a4`, spec: backends/reference_mlp.py) runs fc1's GEMM
with GELU and the quantization of fc2's input fused into its epilogue (csrc/w4a4_mlp.cuh), so the
hidden activation is written only as fc2's 4-bit codes, scales and low-rank product.
"""
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import cuda_build
from ..layers import BACKEND_STATE_ATTR
from ..numerics import INT4_GROUP, unpack_4bit

log = logging.getLogger(__name__)

BLOCK_M = 128  # the GEMM's block tile (csrc/w4a4_int8.h kGemmBlockM/N); padding of M and N
BLOCK_N = 128
_CACHE_ATTR = BACKEND_STATE_ATTR  # dropped by the layer when its buffers move (layers.py)


# ------------------------------------------------------------------------------------------------
# MMA path per GPU (csrc/w4a4_int8.h MmaPath)

PATH_ENV = "SVDQ_MMA_PATH"  # forces a path where the GPU has its instruction (native or emulated)


@dataclass(frozen=True)
class MmaPath:
    name: str              # the bindings' mma_path: the instruction's shape and operand type
    layout: str            # packed layout of the codes: "interleaved" (INT8 MMA) or "native_s4"
    min_capability: tuple  # the oldest GPU with the instruction


MMA_PATHS = {p.name: p for p in (
    MmaPath("s8_m16n8k32", "interleaved", (8, 0)),
    MmaPath("s4_m16n8k64", "native_s4", (8, 0)),
    MmaPath("s4_m8n8k32", "native_s4", (7, 5)),
)}
# NVFP4 layers (E2M1 codes, 16-wide groups): INT8 m16n8k16 on every GPU that has it, except sm_120,
# whose block-scaled FP4 MMA (built for sm_120a only, cuda_build.ARCH_SPECIFIC) multiplies the codes
# as they are and applies the group scales itself.
NVFP4_PATH = MmaPath("e2m1_s8_m16n8k16", "e2m1", (8, 0))
NVFP4_BLOCK_SCALED_PATH = MmaPath("e2m1_bs_m16n8k64", "e2m1_native", (12, 0))


def default_mma_path(capability: tuple) -> str:
    """Native s4 MMA where the GPU runs it at full rate, INT8 MMA on the codes where s4 is emulated."""
    if capability < (8, 0):
        return "s4_m8n8k32"   # Turing: no m16n8k64 s4, no m16n8k32 s8
    if capability < (9, 0):
        return "s4_m16n8k64"  # Ampere, Ada: twice the INT8 rate
    return "s8_m16n8k32"      # Hopper, Blackwell: s4 mma.sync is emulated (DESIGN.md §5)


def mma_path(device) -> MmaPath:
    """The path of the W4A4 INT4 GEMM on `device`: $SVDQ_MMA_PATH if set, else the GPU's default."""
    capability = tuple(int(v) for v in cuda_build.device_arch(device).split("."))
    name = os.environ.get(PATH_ENV) or default_mma_path(capability)
    if name not in MMA_PATHS:
        raise ValueError(f"{PATH_ENV}={name!r} is not an MMA path; choose one of {', '.join(MMA_PATHS)}")
    path = MMA_PATHS[name]
    if capability < path.min_capability:
        need = "sm_%d%d" % path.min_capability
        raise ValueError(f"{PATH_ENV}={name} needs a GPU of {need} or newer; {device} is sm_{capability[0]}{capability[1]}")
    return path


def nvfp4_mma_path(capability: tuple) -> MmaPath:
    """The NVFP4 path of a GPU: the block-scaled FP4 MMA on sm_120 (the only arch with it that we build
    for, as sm_120a), the INT8 m16n8k16 path on the others from sm_80."""
    if capability < NVFP4_PATH.min_capability:
        raise NotImplementedError(f"NVFP4 layers need sm_80 or newer on the 'cuda' backend; this GPU is "
                                  f"sm_{capability[0]}{capability[1]} (use the 'reference' backend, or an INT4 file)")
    return NVFP4_BLOCK_SCALED_PATH if capability == NVFP4_BLOCK_SCALED_PATH.min_capability else NVFP4_PATH


def layer_mma_path(layer, device) -> MmaPath:
    """The path for this layer on `device`: nvfp4_mma_path for NVFP4 layers, else mma_path(device)."""
    if layer.precision != "nvfp4":
        return mma_path(device)
    return nvfp4_mma_path(tuple(int(v) for v in cuda_build.device_arch(device).split(".")))


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


def pack_weight_fragments(qweight: torch.Tensor, n_pad: int, layout: str) -> torch.Tensor:
    """File-layout qweight uint8 [N, K/2] (low nibble = even k) -> int32 [N_pad/16, K/64, 32, 4].

    For column pair p, group g and lane = 4*gid + tid, word 2*t + v holds
    - layout "interleaved" (csrc/w4a4_int8.cu), for b = 0..3:
        nibble 2b   = W[16p + 8t + gid, 64g + 32v      + 4tid + b]   (s8 mma B register b0)
        nibble 2b+1 = W[16p + 8t + gid, 64g + 32v + 16 + 4tid + b]   (s8 mma B register b1)
    - layout "native_s4" (csrc/w4a4_s4.cuh), for e = 0..7:
        nibble e    = W[16p + 8t + gid, 64g + 32v + 8tid + e]         (s4 mma B register b_v)
      i.e. 4 bytes of the file row as they are. "e2m1_native" (NVFP4 on sm_120,
      csrc/w4a4_nvfp4_bs.cuh) is the same with E2M1 codes and K zero-padded to a multiple of 64.
    Padded columns are zero codes."""
    N, half_k = qweight.shape
    K = half_k * 2
    G = K // INT4_GROUP
    if layout in ("native_s4", "e2m1_native"):
        G = _round_up(K, INT4_GROUP) // INT4_GROUP  # NVFP4 K is a multiple of 16
        rows = F.pad(qweight, (0, G * INT4_GROUP // 2 - half_k, 0, n_pad - N))
        # n = 16p + 8t + gid ; byte k/2 = 32g + 16v + 4tid + c
        b = rows.reshape(n_pad // 16, 2, 8, G, 2, 4, 4)  # p, t, gid, g, v, tid, c
        b = b.permute(0, 3, 2, 5, 1, 4, 6)  # p, g, gid, tid, t, v, c
        return b.contiguous().view(torch.int32).reshape(n_pad // 16, G, 32, 4)
    if layout == "e2m1":
        # The interleaved lanes and words, with nibble b of the low / high 16 bits = b0 / b1 register
        # byte b (csrc/w4a4_nvfp4.cuh); K (a multiple of 16) zero-padded to a multiple of 64.
        k64 = _round_up(K, INT4_GROUP)
        nib = torch.nn.functional.pad(unpack_4bit(qweight, signed=False), (0, k64 - K, 0, n_pad - N))
        nib = nib.view(n_pad // 16, 2, 8, k64 // 64, 2, 2, 4, 2, 2)  # p, t, gid, g, v, half, tid, b/2, b%2
        nib = nib.permute(0, 3, 2, 6, 1, 4, 5, 7, 8).contiguous()  # p, g, gid, tid, t, v, half, b/2, b%2
        packed = nib[..., 0] | (nib[..., 1] << 4)  # byte 2*half + b/2 of word 2t + v
        return packed.reshape(n_pad // 16, k64 // 64, 32, 4, 4).contiguous().view(torch.int32).squeeze(-1)
    if layout != "interleaved":
        raise ValueError(f"unknown fragment layout {layout!r}")
    nib = unpack_4bit(qweight, signed=False)  # uint8 [N, K], raw nibbles 0..15
    if n_pad > N:
        nib = torch.cat([nib, nib.new_zeros(n_pad - N, K)])
    # n = 16p + 8t + gid ; k = 64g + 32v + 16half + 4tid + b
    nib = nib.view(n_pad // 16, 2, 8, G, 2, 2, 4, 4)  # p, t, gid, g, v, half, tid, b
    nib = nib.permute(0, 3, 2, 6, 1, 4, 7, 5).contiguous()  # p, g, gid, tid, t, v, b, half
    packed = nib[..., 0] | (nib[..., 1] << 4)  # p, g, gid, tid, t, v, b : one byte per b
    return packed.contiguous().view(torch.int32).reshape(n_pad // 16, G, 32, 4)


def unpack_act_fragments(act_packed: torch.Tensor, M: int, unsigned: bool, layout: str) -> torch.Tensor:
    """Inverse of the activation layout written by the quantize kernel: int32 [M_pad/16, K/64, 32, 4]
    -> codes int8 [M, K] (the layout numerics.quantize_act_int4 returns). For tests.

    For m16 tile mt, group g, lane = 4*gid + tid, word j:
    - "interleaved", byte b: low nibble = code[16mt + gid, 64g + 16j + 4tid + b],
                             high nibble = code[16mt + 8 + gid, same k];
    - "native_s4" (word j = s4 mma register a_j), nibble e:
                             code[16mt + 8(j%2) + gid, 64g + 32(j//2) + 8tid + e];
      "e2m1_native" (NVFP4 on sm_120): the same places, E2M1 codes as uint8 [M, K64];
    - "e2m1" (NVFP4), nibble b of the low / high 16 bits = code[16mt + gid / 16mt + 8 + gid,
                             64g + 16j + 4tid + b]; E2M1 codes as uint8 [M, K64]."""
    MT, G = act_packed.shape[:2]
    raw = act_packed.contiguous().view(torch.uint8)
    nib = torch.stack((raw & 0xF, raw >> 4), dim=-1)  # low, high nibble of each byte
    if layout in ("native_s4", "e2m1_native"):
        nib = nib.view(MT, G, 8, 4, 2, 2, 4, 2)  # mt, g, gid, tid, k half, row half, byte, nibble
        codes = nib.permute(0, 5, 2, 1, 4, 3, 6, 7).reshape(MT * 16, G * INT4_GROUP)[:M]
        if layout == "e2m1_native":
            return codes
    elif layout == "e2m1":
        nib = nib.view(MT, G, 8, 4, 4, 2, 2, 2)  # mt, g, gid, tid, j, row half, b/2, b%2
        return nib.permute(0, 5, 2, 1, 4, 3, 6, 7).reshape(MT * 16, G * INT4_GROUP)[:M]
    elif layout == "interleaved":
        nib = nib.view(MT, G, 8, 4, 4, 4, 2)  # mt, g, gid, tid, j, b, row half
        codes = nib.permute(0, 6, 2, 1, 4, 3, 5).reshape(MT * 16, G * INT4_GROUP)[:M]
    else:
        raise ValueError(f"unknown fragment layout {layout!r}")
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
    wgt_scales: torch.Tensor  # fp32 [K/64, N_pad] (NVFP4: [K64/16, N_pad])
    alpha: float              # NVFP4: wtscale / 4 (the kernels' codes are E2M1 x 2; sm_120's sum x 4); INT4: 1
    channel_scale: torch.Tensor  # NVFP4: wcscales, fp32 [N_pad]; INT4: None
    bias: torch.Tensor        # fp32 [N_pad]
    smooth: torch.Tensor      # fp32 [K]
    lora_down: torch.Tensor   # fp32 [R, K]
    lora_up: torch.Tensor     # fp32 [N_pad, R16]


class _Sources:
    """What a repacked copy was made from: the tensor objects themselves (a replaced buffer is a new
    object even where the caching allocator reuses its address, so data_ptr cannot tell) and their
    version counters (in-place writes; inference tensors have none, and cannot be written in place
    outside inference mode, where ComfyUI samples)."""

    def __init__(self, *tensors):
        self.tensors = tensors
        self.versions = tuple(None if t is None or t.is_inference() else t._version for t in tensors)

    def __eq__(self, other):
        return (isinstance(other, _Sources) and len(self.tensors) == len(other.tensors)
                and all(a is b for a, b in zip(self.tensors, other.tensors)) and self.versions == other.versions)



def _prepare_base(layer, device, layout):
    N = layer.out_features
    n_pad = _round_up(N, BLOCK_N)
    qweight = layer.qweight.to(device)
    wscales = layer.wscales.to(device).float()
    scale_rows = _round_up(layer.in_features, INT4_GROUP) // layer.group_size  # NVFP4: K padded to 64
    wgt_scales = torch.zeros(scale_rows, n_pad, dtype=torch.float32, device=device)
    wgt_scales[:wscales.shape[0], :N] = wscales
    alpha, channel_scale = 1.0, None
    if layer.precision == "nvfp4":
        alpha = float(layer.wtscale.float() / 4)  # one sync per prepare
        channel_scale = torch.zeros(n_pad, dtype=torch.float32, device=device)
        channel_scale[:N] = layer.wcscales.to(device).float()
    bias = torch.zeros(n_pad, dtype=torch.float32, device=device)
    if layer.bias is not None:
        bias[:N] = layer.bias.to(device).float()
    smooth = layer.smooth.to(device).float().contiguous()
    return dict(n_pad=n_pad, wgt_packed=pack_weight_fragments(qweight, n_pad, layout), wgt_scales=wgt_scales,
                alpha=alpha, channel_scale=channel_scale, bias=bias, smooth=smooth)


def _prepare_lora(layer, device, n_pad):
    N, R = layer.out_features, layer.rank
    r16 = _round_up(R, 16)
    lora_down = layer.lora_down.to(device).float().contiguous()
    lora_up = torch.zeros(n_pad, r16, dtype=torch.float32, device=device)
    lora_up[:N, :R] = layer.lora_up.to(device).float()
    return dict(rank=R, lora_down=lora_down, lora_up=lora_up)


def prepare(layer, device, path=None) -> Prepared:
    """The layer's repacked operands on `device` for the MMA path (default: the device's), made once
    and reused while its buffers and the path's layout are unchanged. The low-rank factors are keyed
    separately, so absorbing a LoRA repacks only them."""
    device = torch.device(device)
    layout = (path or layer_mma_path(layer, device)).layout
    cache = layer.__dict__.setdefault(_CACHE_ATTR, {})
    # Keep one device's copy at a time: a layer moved to another GPU should not pin the old copy.
    for other in [d for d in cache if d != device]:
        del cache[other]
    entry = cache.setdefault(device, {})
    base_key = (layout, _Sources(layer.qweight, layer.wscales, layer.bias, layer.smooth,
                                     getattr(layer, "wtscale", None), getattr(layer, "wcscales", None)))
    if entry.get("base_key") != base_key:
        entry["base"] = _prepare_base(layer, device, layout)
        entry["base_key"] = base_key
        entry.pop("lora_key", None)  # n_pad could change with the layer
    lora_key = _Sources(layer.lora_down, layer.lora_up)
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
    """Kernel A alone, unpacked to the spec's layouts (for tests): (codes int8 [M, K] (NVFP4: uint8
    E2M1 codes), scales fp32 [M, K/group], lora_act fp32 [M, rank], raw kernel outputs). poison=True
    pre-fills the outputs with NaN / nibble-8 words so that an element the kernel does not write
    cannot pass (nibble 8 is -0 in E2M1, which the NVFP4 quantizer never writes either)."""
    _check_input(layer, x)
    x2 = _rows(x, layer.in_features)
    path = layer_mma_path(layer, x.device)
    prep = prepare(layer, x.device, path)
    M, K = x2.shape
    outs = {}
    if poison:
        m_pad, G, r16 = _round_up(M, BLOCK_M), _round_up(K, INT4_GROUP) // INT4_GROUP, _round_up(prep.rank, 16)
        scale_rows = G * INT4_GROUP // layer.group_size
        f32 = dict(dtype=torch.float32, device=x.device)
        outs = dict(act_packed_out=torch.full((m_pad // 16, G, 32, 4), _POISON_WORD, dtype=torch.int32, device=x.device),
                    act_scales_out=torch.full((scale_rows, m_pad), float("nan"), **f32),
                    lora_act_out=torch.full((m_pad, r16), float("nan"), **f32))
    with torch.cuda.device(x.device):
        act, scales, lora_act = extension().quantize_act_lora_down(x2, prep.smooth, prep.lora_down, layer.act_unsigned,
                                                                   path.name, **outs)
    return (unpack_act_fragments(act, M, layer.act_unsigned, path.layout)[:, :K],
            scales.T[:M, :K // layer.group_size].contiguous(),
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
        path = layer_mma_path(layer, x.device)
        prep = prepare(layer, x.device, path)
        act, act_scales, lora_act = ext.quantize_act_lora_down(x2, prep.smooth, prep.lora_down, layer.act_unsigned,
                                                               path.name)
        y = ext.w4a4_gemm(act, act_scales, lora_act, prep.wgt_packed, prep.wgt_scales, prep.lora_up, prep.bias,
                          M, N, layer.act_unsigned, path.name, x.dtype, None if out is None else out.view(M, N),
                          alpha=prep.alpha, channel_scale=prep.channel_scale)
    return y.reshape(*x.shape[:-1], N)


def w4a4_linear(layer, x):
    return forward(layer, x)


def w4a16_linear(layer, x, out=None):
    from . import cuda_w4a16  # imports this module

    return cuda_w4a16.forward(extension(), layer, x, out=out)


# ------------------------------------------------------------------------------------------------
# The MLP pair fc1 -> GELU(tanh) -> fc2 (csrc/w4a4_mlp.cuh; spec: backends/reference_mlp.py)


def mlp_fusable(fc1, fc2) -> bool:
    """Whether mlp_w4a4 runs the pair fused: INT4 layers, fc1 with signed input, fc2 with the unsigned
    (shifted GELU) input, as in FLUX. Other pairs (NVFP4 ones included) run as two linears."""
    return fc1.precision == fc2.precision == "int4" and not fc1.act_unsigned and fc2.act_unsigned


def _mlp_fc2_input(fc1, fc2, x2, path, outs):
    """Kernel A on x, then fc1's GEMM with the fused epilogue: fc2's GEMM operands (act, scales, lora_act)."""
    ext = extension()
    p1, p2 = prepare(fc1, x2.device, path), prepare(fc2, x2.device, path)
    act, scales, lora_act = ext.quantize_act_lora_down(x2, p1.smooth, p1.lora_down, False, path.name)
    return ext.w4a4_mlp_fc1(act, scales, lora_act, p1.wgt_packed, p1.wgt_scales, p1.lora_up, p1.bias, x2.shape[0],
                            fc1.out_features, path.name, x2.dtype, p2.smooth, p2.lora_down, **outs)


def _check_pair(fc1, fc2, x):
    if fc1.out_features != fc2.in_features:
        raise ValueError(f"fc1 has {fc1.out_features} outputs but fc2 takes {fc2.in_features} inputs")
    _check_input(fc1, x)


def mlp_w4a4(fc1, fc2, x, out=None):
    """fc2(gelu_tanh(fc1(x))) with an optional preallocated output (contiguous, x.shape[:-1] + (N2,),
    x.dtype). Fusable pairs: 3 launches (kernel A, fc1 + GELU + fc2's input, fc2's GEMM) plus the fixed-order
    sum of fc2's low-rank product when fc2 has a rank; others: two linears."""
    _check_pair(fc1, fc2, x)
    if not mlp_fusable(fc1, fc2):
        return forward(fc2, F.gelu(forward(fc1, x), approximate="tanh"), out=out)
    x2 = _rows(x, fc1.in_features)
    M, N = x2.shape[0], fc2.out_features
    if M == 0:
        return x.new_empty(*x.shape[:-1], N)
    with torch.cuda.device(x.device):
        path = mma_path(x.device)
        act, scales, lora_act = _mlp_fc2_input(fc1, fc2, x2, path, {})
        p2 = prepare(fc2, x.device, path)
        y = extension().w4a4_gemm(act, scales, lora_act, p2.wgt_packed, p2.wgt_scales, p2.lora_up, p2.bias, M, N,
                                  True, path.name, x.dtype, None if out is None else out.view(M, N))
    return y.reshape(*x.shape[:-1], N)


def mlp_fc2_input(fc1, fc2, x, poison=False):
    """The fused fc1 kernel alone, unpacked (for tests): (h [M, N1] in x.dtype as the kernel computed
    it, fc2's input codes uint8 [M, N1], scales fp32 [M, N1/64], lora_act2 fp32 [M, rank2], raw kernel
    outputs). poison=True pre-fills every output with NaN / nibble-8 words (see tests/test_cuda_mlp.py)."""
    _check_pair(fc1, fc2, x)
    if not mlp_fusable(fc1, fc2):
        raise ValueError("the fused MLP kernel takes an INT4 pair with fc1 signed and fc2 unsigned")
    x2 = _rows(x, fc1.in_features)
    M, N1 = x2.shape[0], fc1.out_features
    path = mma_path(x.device)
    m_pad, r16 = _round_up(M, BLOCK_M), _round_up(fc2.rank, 16)
    fill = float("nan") if poison else 0.0
    f32 = dict(dtype=torch.float32, device=x.device)
    outs = dict(act2_packed_out=torch.full((m_pad // 16, N1 // INT4_GROUP, 32, 4), _POISON_WORD if poison else 0,
                                           dtype=torch.int32, device=x.device),
                act2_scales_out=torch.full((N1 // INT4_GROUP, m_pad), fill, **f32),
                lora_act2_out=torch.full((m_pad, r16), fill, **f32),
                hidden_out=torch.full((M, N1), fill, dtype=x.dtype, device=x.device))
    with torch.cuda.device(x.device):
        act, scales, lora_act = _mlp_fc2_input(fc1, fc2, x2, path, outs)
    return (outs["hidden_out"], unpack_act_fragments(act, M, True, path.layout), scales.T[:M].contiguous(),
            lora_act[:M, :fc2.rank].contiguous(), (act, scales, lora_act))
