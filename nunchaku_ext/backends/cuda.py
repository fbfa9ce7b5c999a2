"""The 'cuda' backend: SVDQuant W4A4 INT4 layers on our own kernels (csrc/, built just in time).

Forward of a W4A4 layer, two launches (csrc/w4a4_int8.cu documents kernels and layouts):
  1. quantize_act_lora_down: x -> 4-bit codes (row-major, two per byte, as the file stores weights),
     fp32 group scales, and lora_act = x . lora_downᵀ (fp32), in one read of x;
  2. w4a4_gemm: integer tensor-core GEMM over the 4-bit codes with the group rescale, the low-rank up
     projection and the bias fused into it.

The kernels read the layer's buffers as they are (the file layout, docs/format.md): a loaded model
holds no second, repacked copy, so what ComfyUI counts is what the GPU holds, a LoRA absorbed into the
low-rank branch costs nothing to "re-prepare", and a layer streamed to the GPU for one call (ComfyUI's
low-VRAM mode) runs as it arrives. The kernels compute in the layer's 16-bit dtype: an input of the
other 16-bit dtype is cast to it, and the output back (the spec reads the input in fp32, so this
rounding of x is the one difference from it; ComfyUI builds our layers in its compute dtype, so its
inputs already match).

The GEMM's MMA instruction is picked per GPU (`mma_path`): native s4 `m8n8k32` on sm_75, native s4
`m16n8k64` on sm_80/86/89, INT8 `m16n8k32` on the codes on sm_90/sm_120 (their s4 MMA is emulated).
All give the same outputs. On sm_90 the default is the wgmma path instead (`e4m3_wgmma_sm90a`,
csrc/w4a4_sm90a.cu: warpgroup MMAs on the codes as E4M3 bytes, its own kernel A layout and bindings, the same
GEMM sums bit for bit, the low-rank branch as tf32 hi/lo wgmmas within the spec's tolerance) for the INT4
layers it takes (N % 64 == 0, K % 128 == 0); the others, and the fused MLP pair, run on `s8_m16n8k32`. $SVDQ_MMA_PATH forces one (the tests run the consumer-GPU paths on a
Hopper GPU that way). NVFP4 layers take their own path (`nvfp4_mma_path`): on sm_120 the block-scaled
FP4 MMA `m16n8k64 kind::mxf4nvf4` (csrc/w4a4_nvfp4_bs.cuh), on sm_80..sm_90 E2M1 codes x 2 as int8,
INT8 `m16n8k16` per 16-group (csrc/w4a4_nvfp4.cuh).

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
from .. import numerics
from ..numerics import INT4_GROUP, unpack_4bit

log = logging.getLogger(__name__)

BLOCK_M = 128  # the GEMM's block tile in M (csrc/w4a4_int8.h kGemmBlockM): padding of the activations


# ------------------------------------------------------------------------------------------------
# MMA path per GPU (csrc/w4a4_int8.h MmaPath)

PATH_ENV = "SVDQ_MMA_PATH"  # forces a path where the GPU has its instruction (native or emulated)


@dataclass(frozen=True)
class MmaPath:
    name: str              # the bindings' mma_path: the instruction's shape and operand type
    layout: str            # which k of a 64-chunk each lane owns (csrc: the Layout struct kernel A is built for)
    min_capability: tuple  # the oldest GPU with the instruction
    exact_capability: bool = False  # built arch-specific (sm_90a): runs on the min_capability GPUs only


# sm_90's INT4 GEMM on warpgroup MMAs (csrc/w4a4_sm90a.cu: wgmma e4m3 on the 4-bit codes as E4M3 bytes, TMA,
# a persistent warp-specialized kernel, the low-rank up projection as tf32 hi/lo wgmmas; kernel A writes one
# code byte per value for it). Its own bindings (quantize_act_sm90a, w4a4_gemm_sm90a); bit-identical outputs
# to the mma.sync paths at rank 0, within the spec's tolerance with a low-rank branch. It takes INT4 layers
# with N % 64 == 0 and K % 128 == 0 (wgmma_takes); the other layers and the fused MLP pair run on
# WGMMA_FALLBACK.
WGMMA_PATH = MmaPath("e4m3_wgmma_sm90a", "Lane16E4M3Layout", (9, 0), exact_capability=True)
WGMMA_FALLBACK = "s8_m16n8k32"
WGMMA_N_MULTIPLE, WGMMA_K_MULTIPLE = 64, 128  # csrc/w4a4_sm90a.h kSm90aNMultiple / kSm90aBlockK

MMA_PATHS = {p.name: p for p in (
    MmaPath("s8_m16n8k32", "Lane16Layout", (8, 0)),
    MmaPath("s4_m16n8k64", "Lane16Layout", (8, 0)),
    MmaPath("s4_m8n8k32", "Lane16Layout", (7, 5)),
    WGMMA_PATH,
)}
# NVFP4 layers (E2M1 codes, 16-wide groups): INT8 m16n8k16 on every GPU that has it, except sm_120,
# whose block-scaled FP4 MMA (built for sm_120a only, cuda_build.ARCH_SPECIFIC) multiplies the codes
# as they are and applies the group scales itself.
NVFP4_PATH = MmaPath("e2m1_s8_m16n8k16", "E2M1Layout", (8, 0))
NVFP4_BLOCK_SCALED_PATH = MmaPath("e2m1_bs_m16n8k64", "E2M1NativeLayout", (12, 0))


def default_mma_path(capability: tuple) -> str:
    """Native s4 MMA where the GPU runs it at full rate, INT8 MMA on the codes where s4 is emulated."""
    if capability < (8, 0):
        return "s4_m8n8k32"   # Turing: no m16n8k64 s4, no m16n8k32 s8
    if capability < (9, 0):
        return "s4_m16n8k64"  # Ampere, Ada: twice the INT8 rate
    if capability == (9, 0):
        return WGMMA_PATH.name  # Hopper: wgmma (sm_90a), 3-4x the mma.sync GEMM (docs/benchmarks.md)
    return "s8_m16n8k32"      # Blackwell: s4 mma.sync is emulated (DESIGN.md §5)


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
    if path.exact_capability and capability != path.min_capability:
        need = "sm_%d%d" % path.min_capability
        raise ValueError(f"{PATH_ENV}={name} runs on {need} GPUs only (built arch-specific); {device} is "
                         f"sm_{capability[0]}{capability[1]}")
    return path


def wgmma_takes(layer) -> bool:
    """Whether the sm_90a wgmma GEMM takes this layer: INT4, N a multiple of 64 (one warpgroup's rows) and K
    of 128 (one pipeline stage)."""
    return (layer.precision == "int4" and layer.out_features % WGMMA_N_MULTIPLE == 0
            and layer.in_features % WGMMA_K_MULTIPLE == 0)


def _mma_sync_path(path: MmaPath) -> MmaPath:
    """The mma.sync path that runs what `path` cannot: the wgmma path's fallback, else `path` itself."""
    return MMA_PATHS[WGMMA_FALLBACK] if path is WGMMA_PATH else path


def nvfp4_mma_path(capability: tuple) -> MmaPath:
    """The NVFP4 path of a GPU: the block-scaled FP4 MMA on sm_120 (the only arch with it that we build
    for, as sm_120a), the INT8 m16n8k16 path on the others from sm_80."""
    if capability < NVFP4_PATH.min_capability:
        raise NotImplementedError(f"NVFP4 layers need sm_80 or newer on the 'cuda' backend; this GPU is "
                                  f"sm_{capability[0]}{capability[1]} (use the 'reference' backend, or an INT4 file)")
    return NVFP4_BLOCK_SCALED_PATH if capability == NVFP4_BLOCK_SCALED_PATH.min_capability else NVFP4_PATH


def layer_mma_path(layer, device) -> MmaPath:
    """The path for this layer on `device`: nvfp4_mma_path for NVFP4 layers, else mma_path(device), with
    the wgmma path's fallback for the shapes it does not take (wgmma_takes)."""
    if layer.precision != "nvfp4":
        path = mma_path(device)
        return path if path is not WGMMA_PATH or wgmma_takes(layer) else _mma_sync_path(path)
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


def _round_up(v, m):
    return (v + m - 1) // m * m


# ------------------------------------------------------------------------------------------------
# Forward


def _check_input(layer, x):
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"input has {x.shape[-1]} features in its last dimension, the layer takes {layer.in_features}")
    if not x.is_cuda:
        raise ValueError(f"the 'cuda' backend needs the input on a CUDA device, got {x.device}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"the 'cuda' backend takes bfloat16 or float16 input, got {x.dtype}")
    if layer.out_features % 2:
        raise NotImplementedError(f"the 'cuda' kernels need an even number of output features, this layer has "
                                  f"{layer.out_features} (use the 'reference' backend for it)")


def _rows(x, K, dtype):
    x2 = x.reshape(-1, K).to(dtype)
    # The quantize kernel reads 4 elements (8 bytes) at a time and takes any row stride divisible by 4.
    if x2.stride(-1) != 1 or x2.stride(0) % 4 or x2.data_ptr() % 8:
        x2 = x2.contiguous()
    return x2


def operand(t, device, dtype=None):
    """A layer tensor as the kernels take it: on `device`, contiguous, 16-byte aligned, and (dtype
    given) of that dtype — `t` itself when it already is (a loaded model's buffers are), else a copy
    for this call only (a layer left on another device, a view, an unusual cast)."""
    if t is None:
        return None
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if t.device != device:
        t = t.to(device)
    if not t.is_contiguous() or (t.numel() and t.data_ptr() % 16):
        t = t.clone(memory_format=torch.contiguous_format)  # a fresh allocation: aligned
    return t


def layer_operands(layer, device) -> dict:
    """The layer's tensors as w4a4_gemm's keyword arguments (see csrc/w4a4_ops.cpp)."""
    dtype = layer.lora_up.dtype  # the layer's 16-bit dtype: its smooth, low-rank factors, bias, INT4 scales
    nvfp4 = layer.precision == "nvfp4"
    return dict(qweight=operand(layer.qweight, device), wscales=operand(layer.wscales, device, None if nvfp4 else dtype),
                lora_up=operand(layer.lora_up, device), bias=operand(layer.bias, device, dtype),
                wtscale=operand(layer.wtscale, device, torch.float32) if nvfp4 else None,
                wcscales=operand(layer.wcscales, device, torch.float32) if nvfp4 else None)


def _act_operands(layer, device):
    """(smooth, lora_down) as kernel A takes them, in the layer's dtype."""
    dtype = layer.lora_up.dtype
    return operand(layer.smooth, device, dtype), operand(layer.lora_down, device, dtype)


_POISON_BYTE = 0x88  # every nibble 8: a code the signed quantizer never writes


def quantize_act(layer, x, poison=False):
    """Kernel A alone, unpacked to the spec's layouts (for tests): (codes int8 [M, K] (NVFP4: uint8
    E2M1 codes), scales fp32 [M, K/group], lora_act fp32 [M, rank], raw kernel outputs). poison=True
    pre-fills the outputs with NaN / nibble-8 bytes so that an element the kernel does not write
    cannot pass (nibble 8 is -0 in E2M1, which the NVFP4 quantizer never writes either)."""
    _check_input(layer, x)
    x2 = _rows(x, layer.in_features, layer.lora_up.dtype)
    path = layer_mma_path(layer, x.device)
    M, K = x2.shape
    if path is WGMMA_PATH:
        return _quantize_act_wgmma(layer, x2, poison)
    outs = {}
    if poison:
        m_pad, G, r16 = _round_up(M, BLOCK_M), _round_up(K, INT4_GROUP) // INT4_GROUP, _round_up(layer.rank, 16)
        scale_rows = G * INT4_GROUP // layer.group_size
        f32 = dict(dtype=torch.float32, device=x.device)
        outs = dict(act_packed_out=torch.full((m_pad, G * INT4_GROUP // 2), _POISON_BYTE, dtype=torch.uint8,
                                              device=x.device),
                    act_scales_out=torch.full((scale_rows, m_pad), float("nan"), **f32),
                    lora_act_out=torch.full((m_pad, r16), float("nan"), **f32))
    with torch.cuda.device(x.device):
        act, scales, lora_act = extension().quantize_act_lora_down(x2, *_act_operands(layer, x.device),
                                                                   layer.act_unsigned, path.name, **outs)
    codes = unpack_4bit(act[:M], signed=layer.precision == "int4" and not layer.act_unsigned)
    return (codes[:, :K], scales.T[:M, :K // layer.group_size].contiguous(), lora_act[:M, :layer.rank].contiguous(),
            (act, scales, lora_act))


def _e4m3_act_to_file_layout(act, act_scales, signed):
    """The wgmma path's kernel A outputs -> (codes int16 [M_pad, K] in k order, the same codes packed as
    kernel A's other layout packs them, uint8 [M_pad, K/2], scales fp32 [K/64, M_pad] in token order).
    csrc/w4a4_sm90a.cu: byte = E4M3 code of q * 2^-9 (sign | magnitude; unsigned codes are the byte), at
    position p = 32v + 16h + 4t + b of its 64-group for k = 16t + 8v + 2b + h; scale slot 16c + 4t + 2h + e
    of token 16c + 8h + 2t + e. A byte the kernel never writes (0x88 = -8, or 136 unsigned) stays visible."""
    b = act.to(torch.int16)
    vals = torch.where(b >= 0x80, -(b & 0x7F), b) if signed else b
    m_pad, K = act.shape
    codes = vals.view(m_pad, K // 64, 2, 2, 4, 4).permute(0, 1, 4, 2, 5, 3).reshape(m_pad, K)  # (v,h,t,b) -> (t,v,b,h)
    G = act_scales.shape[0]
    scales = act_scales.view(G, m_pad // 16, 4, 2, 2).permute(0, 1, 3, 2, 4).reshape(G, m_pad)  # (t,h,e) -> (h,t,e)
    return codes, numerics.pack_4bit(codes), scales


def _quantize_act_wgmma(layer, x2, poison):
    """quantize_act on the wgmma path: its kernel A, its outputs brought to the other paths' layouts."""
    M, K = x2.shape
    outs = {}
    if poison:
        m_pad, r16 = _round_up(M, BLOCK_M), _round_up(layer.rank, 16)
        f32 = dict(dtype=torch.float32, device=x2.device)
        outs = dict(act_out=torch.full((m_pad, K), _POISON_BYTE, dtype=torch.uint8, device=x2.device),
                    act_scales_out=torch.full((K // INT4_GROUP, m_pad), float("nan"), **f32),
                    lora_act_out=torch.full((m_pad, r16), float("nan"), **f32))
    with torch.cuda.device(x2.device):
        act, scales, lora_act = extension().quantize_act_sm90a(x2, *_act_operands(layer, x2.device),
                                                               layer.act_unsigned, **outs)
    signed = not layer.act_unsigned
    codes, packed, scales = _e4m3_act_to_file_layout(act, scales, signed)
    codes = codes[:M].to(torch.int8 if signed else torch.uint8)
    return (codes, scales.T[:M].contiguous(), lora_act[:M, :layer.rank].contiguous(), (packed, scales, lora_act))


def kernel_a(layer, x2, path):
    """Kernel A of `path` on rows x2 [M, K] (the layer's dtype): (act, act_scales, lora_act) as kernel_b
    takes them."""
    ext, smooth_lora_down = extension(), _act_operands(layer, x2.device)
    if path is WGMMA_PATH:
        return ext.quantize_act_sm90a(x2, *smooth_lora_down, layer.act_unsigned)
    return ext.quantize_act_lora_down(x2, *smooth_lora_down, layer.act_unsigned, path.name)


def kernel_b(layer, quantized, M, path, out=None):
    """The GEMM of `path` with its fused epilogue on kernel_a's outputs: y [M, N] in the layer's dtype,
    written into `out` (contiguous [M, N]) if given."""
    ext, ops = extension(), layer_operands(layer, quantized[0].device)
    if path is not WGMMA_PATH:
        return ext.w4a4_gemm(*quantized, M=M, act_unsigned=layer.act_unsigned, mma_path=path.name, out=out, **ops)
    del ops["wtscale"], ops["wcscales"]  # INT4 only
    if out is not None and out.data_ptr() % 16:  # the wgmma GEMM stores 16 bytes at a time
        return out.copy_(ext.w4a4_gemm_sm90a(*quantized, M=M, **ops))
    return ext.w4a4_gemm_sm90a(*quantized, M=M, out=out, **ops)


def forward(layer, x, out=None):
    """w4a4_linear with an optional preallocated output (contiguous, x.shape[:-1] + (N,), x.dtype)."""
    _check_input(layer, x)
    K, N = layer.in_features, layer.out_features
    dtype = layer.lora_up.dtype
    x2 = _rows(x, K, dtype)
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*x.shape[:-1], N)
    direct = out is not None and x.dtype == dtype  # else the kernel's output is cast into `out`
    with torch.cuda.device(x.device):
        path = layer_mma_path(layer, x.device)
        y = kernel_b(layer, kernel_a(layer, x2, path), M, path, out.view(M, N) if direct else None)
    y = y.reshape(*x.shape[:-1], N)
    if out is not None and not direct:
        return out.copy_(y)
    return y.to(x.dtype)


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
    dev = x2.device
    act, scales, lora_act = ext.quantize_act_lora_down(x2, *_act_operands(fc1, dev), False, path.name)
    ops1 = layer_operands(fc1, dev)
    del ops1["wtscale"], ops1["wcscales"]  # INT4 only
    return ext.w4a4_mlp_fc1(act, scales, lora_act, M=x2.shape[0], mma_path=path.name, **ops1,
                            smooth2=_act_operands(fc2, dev)[0], lora_down2=_act_operands(fc2, dev)[1], **outs)


def _check_pair(fc1, fc2, x):
    if fc1.out_features != fc2.in_features:
        raise ValueError(f"fc1 has {fc1.out_features} outputs but fc2 takes {fc2.in_features} inputs")
    if fc1.lora_up.dtype != fc2.lora_up.dtype:
        raise TypeError(f"fc1 and fc2 must have one dtype, got {fc1.lora_up.dtype} and {fc2.lora_up.dtype}")
    _check_input(fc1, x)
    _check_input(fc2, x.new_empty(0, fc2.in_features))


# The fused MLP kernels are mma.sync ones. Where the two linears would run on the wgmma path (sm_90), the
# pair is fused up to this many rows. Since the wgmma GEMM's tf32 low-rank epilogue and the split-K kernel A
# (2026-11-22), two linears win at every M measured: H200, FLUX's MLP (3072 -> 12288 -> 3072, rank 32),
# fused 0.517 ms vs two linears 0.204 ms at M = 512, 1.44 ms both at M = 4096 (bench/bench_flux_linears.py,
# docs/benchmarks.md). So: never; a wgmma version of the fused kernels would change that.
FUSED_MLP_MAX_ROWS_BESIDE_WGMMA = 0


def _fused_mlp_pays(fc1, fc2, x2) -> bool:
    """Whether the fused kernels beat the pair as two linears on x2's device for its number of rows."""
    if WGMMA_PATH not in (layer_mma_path(fc1, x2.device), layer_mma_path(fc2, x2.device)):
        return True
    return x2.shape[0] <= FUSED_MLP_MAX_ROWS_BESIDE_WGMMA


def mlp_w4a4(fc1, fc2, x, out=None):
    """fc2(gelu_tanh(fc1(x))) with an optional preallocated output (contiguous, x.shape[:-1] + (N2,),
    x.dtype). Fusable pairs: 3 launches (kernel A, fc1 + GELU + fc2's input, fc2's GEMM) plus the fixed-order
    sum of fc2's low-rank product when fc2 has a rank; others: two linears."""
    _check_pair(fc1, fc2, x)
    dtype = fc1.lora_up.dtype
    x2 = _rows(x, fc1.in_features, dtype)
    M, N = x2.shape[0], fc2.out_features
    if not mlp_fusable(fc1, fc2) or not _fused_mlp_pays(fc1, fc2, x2):
        return forward(fc2, F.gelu(forward(fc1, x), approximate="tanh"), out=out)
    if M == 0:
        return x.new_empty(*x.shape[:-1], N)
    direct = out is not None and x.dtype == dtype
    with torch.cuda.device(x.device):
        path = _mma_sync_path(mma_path(x.device))  # the fused kernels are mma.sync ones
        act, scales, lora_act = _mlp_fc2_input(fc1, fc2, x2, path, {})
        y = extension().w4a4_gemm(act, scales, lora_act, M=M, act_unsigned=True, mma_path=path.name,
                                  out=out.view(M, N) if direct else None, **layer_operands(fc2, x.device))
    y = y.reshape(*x.shape[:-1], N)
    if out is not None and not direct:
        return out.copy_(y)
    return y.to(x.dtype)


def mlp_fc2_input(fc1, fc2, x, poison=False):
    """The fused fc1 kernel alone, unpacked (for tests): (h [M, N1] in the layers' dtype as the kernel
    computed it, fc2's input codes uint8 [M, N1], scales fp32 [M, N1/64], lora_act2 fp32 [M, rank2], raw
    kernel outputs). poison=True pre-fills every output with NaN / nibble-8 bytes (see tests/test_cuda_mlp.py)."""
    _check_pair(fc1, fc2, x)
    if not mlp_fusable(fc1, fc2):
        raise ValueError("the fused MLP kernel takes an INT4 pair with fc1 signed and fc2 unsigned")
    dtype = fc1.lora_up.dtype
    x2 = _rows(x, fc1.in_features, dtype)
    M, N1 = x2.shape[0], fc1.out_features
    path = _mma_sync_path(mma_path(x.device))
    m_pad, r16 = _round_up(M, BLOCK_M), _round_up(fc2.rank, 16)
    fill = float("nan") if poison else 0.0
    f32 = dict(dtype=torch.float32, device=x.device)
    outs = dict(act2_packed_out=torch.full((m_pad, N1 // 2), _POISON_BYTE if poison else 0, dtype=torch.uint8,
                                           device=x.device),
                act2_scales_out=torch.full((N1 // INT4_GROUP, m_pad), fill, **f32),
                lora_act2_out=torch.full((m_pad, r16), fill, **f32),
                hidden_out=torch.full((M, N1), fill, dtype=dtype, device=x.device))
    with torch.cuda.device(x.device):
        act, scales, lora_act = _mlp_fc2_input(fc1, fc2, x2, path, outs)
    return (outs["hidden_out"], unpack_4bit(act[:M], signed=False), scales.T[:M].contiguous(),
            lora_act[:M, :fc2.rank].contiguous(), (act, scales, lora_act))
