"""The 4-bit numerics of SVDQuant, defined once.

Everything here is plain torch and runs on any device. The reference backend is built from these
functions, and every CUDA kernel is tested against them, so each choice below (division in fp32,
round half to even, how a zero group is handled) is part of the spec, not an implementation detail.

Formats (shared/DESIGN.md §2; docs/format.md gives the file layout):
  INT4    groups of 64 along K, symmetric codes in [-7, 7] (files may hold -8), one scale per group.
  INT4u   the unsigned-input variant for MLP down projections: input shifted by UNSIGNED_SHIFT so a
          GELU output is non-negative, codes in [0, 15].
  NVFP4   groups of 16, E2M1 codes, FP8-E4M3 group scales, and for weights a per-tensor fp32 alpha.
  W4A16   weight-only INT4 for the modulation linears: unsigned codes in [0, 15], per-group scale and
          zero point (w = code * scale + zero), groups of 64 along K.
"""
import torch

INT4_GROUP = 64
NVFP4_GROUP = 16
W4A16_GROUP = 64

# Nunchaku's shift for GELU outputs (GELU's minimum is about -0.17): x + 0.171875 >= 0, so the
# quantizer can spend all 16 codes on the non-negative range. The stored bias compensates it.
UNSIGNED_SHIFT = 0.171875

E4M3_MAX = 448.0
E2M1_MAX = 6.0
# Magnitudes of the 8 non-negative E2M1 codes; bit 3 of a code is the sign.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

PRECISIONS = ("int4", "nvfp4")
GROUP_SIZE = {"int4": INT4_GROUP, "nvfp4": NVFP4_GROUP}


def _div(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """t / divisor as true fp32 division on every device. (On CUDA, torch turns division by a Python
    scalar into multiplication by its reciprocal, which can be one ulp off.)"""
    return t / torch.full_like(t, divisor)


def _grouped(t: torch.Tensor, group: int) -> torch.Tensor:
    """[..., K] -> [..., K/group, group]."""
    if t.shape[-1] % group:
        raise ValueError(f"last dimension {t.shape[-1]} is not a multiple of the group size {group}")
    return t.unflatten(-1, (t.shape[-1] // group, group))


def expand_groups(scales: torch.Tensor, group: int) -> torch.Tensor:
    """Per-group values [..., K/group] -> per-element [..., K]."""
    return scales.repeat_interleave(group, dim=-1)


# ---------------------------------------------------------------------------------------------
# Packing: two 4-bit codes per byte along the last dimension, the even index in the LOW nibble.


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Codes [..., K] (any integer dtype; negatives as two's complement nibbles) -> uint8 [..., K/2]."""
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"pack_4bit takes integer codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_4bit needs an even last dimension, got {codes.shape[-1]}")
    nibbles = codes.to(torch.int16).bitwise_and(0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_4bit(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """uint8 [..., K/2] -> codes [..., K]: int8 in [-8, 7] if signed, else uint8 in [0, 15]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_4bit takes uint8, got {packed.dtype}")
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
    if not signed:
        return codes
    codes = codes.to(torch.int8)
    return codes - (codes >= 8).to(torch.int8) * 16


# ---------------------------------------------------------------------------------------------
# INT4


def smooth_input(x: torch.Tensor, smooth: torch.Tensor, unsigned: bool) -> torch.Tensor:
    """The quantized branch's input in fp32: (x [+ UNSIGNED_SHIFT]) / smooth, division in fp32."""
    xs = x.float()
    if unsigned:
        xs = xs + UNSIGNED_SHIFT
    return xs / smooth.float()


def quantize_int4_symmetric(v: torch.Tensor, scale_dtype: torch.dtype = torch.float32):
    """Per 64-group along the last dim: scale = absmax / 7 (rounded to scale_dtype), codes =
    round_half_even(v / scale) clamped to [-7, 7]; a group with scale 0 gets codes 0.

    v is fp32 [..., K]. Returns (codes int8 [..., K], scales scale_dtype [..., K/64])."""
    groups = _grouped(v.float(), INT4_GROUP)
    scales = _div(groups.abs().amax(dim=-1), 7.0).to(scale_dtype)
    return _codes_for_scales(groups, scales, -7, 7), scales


def _codes_for_scales(groups, scales, lo, hi):
    s = scales.float().unsqueeze(-1)
    codes = torch.where(s > 0, torch.round(groups / s), 0.0).clamp(lo, hi)
    return codes.flatten(-2).to(torch.int8)


def quantize_act_int4(xs: torch.Tensor, unsigned: bool = False):
    """Activation quantization (DESIGN.md §2) of xs = smooth_input(...), fp32 [M, K].

    Signed: scale = absmax / 7, codes in [-7, 7]. Unsigned: scale = max / 15, codes in [0, 15]
    (negative values, which only rounding can produce after the shift, become 0).
    Returns (codes int8 [M, K], scales fp32 [M, K/64])."""
    if not unsigned:
        return quantize_int4_symmetric(xs)
    groups = _grouped(xs.float(), INT4_GROUP)
    scales = _div(groups.amax(dim=-1).clamp_min(0.0), 15.0)
    return _codes_for_scales(groups, scales, 0, 15), scales


# ---------------------------------------------------------------------------------------------
# NVFP4


def round_to_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (round half to even, saturating at ±6): float [...] -> uint8 codes [...]."""
    magnitude = v.abs().float()
    midpoints = torch.tensor(_E2M1_MIDPOINTS, device=v.device)
    index = torch.bucketize(magnitude, midpoints)  # a tie lands on the lower neighbour
    at_tie = magnitude == midpoints[index.clamp(max=len(_E2M1_MIDPOINTS) - 1)]
    index = index + (at_tie & (index % 2 == 1)).to(index.dtype)  # ties to the even code
    negative = (v < 0) & (index > 0)  # no negative zero
    return (index | negative.to(index.dtype) << 3).to(torch.uint8)


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes -> fp32 values."""
    table = torch.tensor(E2M1_MAGNITUDES, device=codes.device)
    codes = codes.long()
    return table[codes & 7] * (1 - 2 * (codes >> 3)).float()


def quantize_act_nvfp4(xs: torch.Tensor):
    """Per 16-group along the last dim: scale = e4m3(min(absmax / 6, 448)), codes =
    round_to_e2m1(xs / scale); a group whose scale rounds to 0 gets codes 0.

    xs is fp32 [M, K]. Returns (codes uint8 [M, K], scales float8_e4m3fn [M, K/16])."""
    groups = _grouped(xs.float(), NVFP4_GROUP)
    scales = _div(groups.abs().amax(dim=-1), E2M1_MAX).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    return _e2m1_codes_for_scales(groups, scales), scales


def _e2m1_codes_for_scales(groups, scales):
    s = scales.float().unsqueeze(-1)
    return round_to_e2m1(torch.where(s > 0, groups / s, 0.0)).flatten(-2)


def quantize_weight_nvfp4(w: torch.Tensor):
    """NVFP4 weight quantization of w [N, K]: alpha = absmax(w) / (6 * 448) (fp32, per tensor),
    group scales e4m3(absmax_g / (6 * alpha)), codes round_to_e2m1(w / (alpha * scale)).

    Returns (codes uint8 [N, K], scales float8_e4m3fn [N, K/16], alpha fp32 scalar)."""
    w = w.float()
    absmax = w.abs().amax()
    alpha = torch.where(absmax > 0, _div(absmax, E2M1_MAX * E4M3_MAX), 1.0)
    groups = _grouped(w / alpha, NVFP4_GROUP)
    scales = _div(groups.abs().amax(dim=-1), E2M1_MAX).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    return _e2m1_codes_for_scales(groups, scales), scales, alpha


# ---------------------------------------------------------------------------------------------
# W4A16 (weight-only, asymmetric)


def quantize_weight_w4a16(w: torch.Tensor, scale_dtype: torch.dtype):
    """Per 64-group along K of w [N, K]: scale = (max - min) / 15 and zero = min, both rounded to
    scale_dtype; codes = round_half_even((w - zero) / scale) clamped to [0, 15] (0 where scale is 0).

    Returns (codes uint8 [N, K], scales [N, K/64], zeros [N, K/64])."""
    groups = _grouped(w.float(), W4A16_GROUP)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = _div(hi - lo, 15.0).to(scale_dtype)
    zeros = lo.to(scale_dtype)
    codes = _codes_for_scales(groups - zeros.float().unsqueeze(-1), scales, 0, 15)
    return codes.to(torch.uint8), scales, zeros
