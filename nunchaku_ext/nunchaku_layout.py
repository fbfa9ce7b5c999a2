"""Nunchaku's published SVDQuant FLUX.1 checkpoints, decoded layer by layer into our layout.

Pure torch, no ComfyUI. docs/nunchaku-format.md states every layout fact used here and the public
file it comes from; in short:

  W4A4 (SVDQW4A4Linear / C++ GEMM_W4A4): `qweight` int8 [Np, Kp/2] in MMA-fragment order, `wscales`
  [Kp/64, Np] (int4, bf16/fp16) or [Kp/16, Np] (nvfp4, e4m3) in a lane-permuted order, per-channel
  vectors (`bias`, `smooth`, `smooth_orig`, `wcscales`) permuted within 128-wide tiles, low-rank
  factors `lora_down` [Kp, Rp] and `lora_up` [Np, Rp] in 16x16 fragment tiles, `wtscale` [1].
  Np, Kp are N, K padded to 128; Rp is the rank padded to 16.
  W4A16 (AWQW4A16Linear / GEMV_AWQ): `qweight` int32 [N/4, K/2] in TinyChat's interleave,
  `wscales` and `wzeros` [K/64 (maybe padded), N], rows of all of them interleaved by adaLN chunk,
  and +1 folded into the bias of the `scale` chunks.

What this module returns is in OUR file layout (docs/format.md), ready for
`nunchaku_ext.layers.make_layer(spec, precision).load_state_dict(tensors)`. Assembling a whole
checkpoint from these layers is nunchaku_ext.nunchaku_import.
"""
import json
import os
from dataclasses import dataclass

import torch

from .format import CheckpointError
from .layers import COMPUTE_DTYPES, LayerSpec, make_layer
from .numerics import GROUP_SIZE, INT4_GROUP, NVFP4_GROUP, W4A16_GROUP, pack_4bit


class NunchakuFormatError(CheckpointError):
    """A Nunchaku checkpoint (or one of its layers) that this importer cannot read faithfully. A
    CheckpointError, so that a loader reports it like any other unreadable checkpoint."""


# Nunchaku pads N and K to its warp tile (GEMM_W4A4: in/out_features_pad = ceil(·/128)*128) and the
# rank to the 16x16 low-rank fragment (packer.pack_lowrank_weight).
TILE = 128
RANK_TILE = 16

# ---------------------------------------------------------------------------------------------
# Fragment layouts -> plain tensors. Each function inverts one of Nunchaku's packers
# (nunchaku/lora/flux/packer.py, deepcompressor/backend/{nunchaku,tinychat}/utils.py).


def _w4a4_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """int8 [Np, Kp/2] (NunchakuWeightPacker.pack_weight, bits=4, warp_n=128) -> nibbles uint8 [Np, Kp].

    Memory holds int32 words in the order (n_tile, k_tile, n_pack[8], n_lane[8], k_lane[4],
    n_sub[2], k_sub[2]); word nibble r (little-endian, low nibble first) is k = k_tile*64 +
    k_sub*32 + k_lane*8 + r of row n = n_tile*128 + n_pack*16 + n_sub*8 + n_lane."""
    n_pad, k_pad = qweight.shape[0], qweight.shape[1] * 2
    raw = qweight.contiguous().view(torch.uint8).reshape(-1)
    nibbles = torch.stack((raw & 0xF, raw >> 4), dim=-1).reshape(
        n_pad // TILE, k_pad // 64, 8, 8, 4, 2, 2, 8)  # t, kt, np, nl, kl, ns, ks, r
    return nibbles.permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(n_pad, k_pad)


def _group_scales(wscales: torch.Tensor) -> torch.Tensor:
    """[G, Np] as written by pack_scale (group 64, warp_n=128) -> plain [G, Np].

    Memory order is (n_tile, group, a[8], c[4], b[2], d[2]) with n = n_tile*128 + a*16 + b*8 + c*2 + d
    (the packer's comment: lane 0 loads channels 0 1 8 9, lane 1 loads 2 3 10 11, ...)."""
    groups, n_pad = wscales.shape
    t = wscales.contiguous().reshape(n_pad // TILE, groups, 8, 4, 2, 2)
    return t.permute(1, 0, 2, 4, 3, 5).reshape(groups, n_pad)


def _channel_vector(v: torch.Tensor) -> torch.Tensor:
    """[Np] per-channel vector (bias, smooth, wcscales: pack_scale with group_size=-1) -> plain [Np]."""
    return _group_scales(v.reshape(1, -1)).reshape(-1)


def _micro_scales(wscales: torch.Tensor) -> torch.Tensor:
    """e4m3 [Kp/16, Np] as written by pack_micro_scale (group 16, warp_n=128) -> plain [Kp/16, Np].

    Memory order is (n_tile, k_tile64, l[8], q[4], p[4], j[4]) with n = n_tile*128 + p*32 + q*8 + l
    and group = k_tile64*4 + j (the packer's comment: lane 0 loads 0 32 64 96, lane 1 8 40 72 104)."""
    groups, n_pad = wscales.shape
    raw = wscales.contiguous().view(torch.uint8).reshape(n_pad // TILE, groups // 4, 8, 4, 4, 4)
    plain = raw.permute(1, 5, 0, 4, 3, 2).reshape(groups, n_pad)
    return plain.view(torch.float8_e4m3fn)


def _lowrank(t: torch.Tensor, down: bool) -> torch.Tensor:
    """pack_lowrank_weight's 16x16 fragment tiles -> plain factors.

    down: file [Kp, Rp] -> [Rp, Kp]; up: file [Np, Rp] -> [Np, Rp]. Within each tile (outer index
    `o`: the rank for down, the output channel for up; inner index `i`) memory runs
    (o_lane[8], i_lane[4], o_sub[2], i_sub[2], i_reg[2]) with o = o_sub*8 + o_lane and
    i = i_sub*8 + i_lane*2 + i_reg; tiles run (channel tile, rank tile)."""
    rows, rank = t.shape
    tiles = t.contiguous().reshape(rows // RANK_TILE, rank // RANK_TILE, 8, 4, 2, 2, 2)
    if down:  # channel tile is the inner (i) axis, rank tile the outer (o) axis
        return tiles.permute(1, 4, 2, 0, 5, 3, 6).reshape(rank, rows)
    return tiles.permute(0, 4, 2, 1, 5, 3, 6).reshape(rows, rank)


def _awq_codes(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N/4, K/2] (TinyChat pack_w4, via deepcompressor) -> codes uint8 [N, K] in [0, 15].

    Viewed as int16 [N/4, K]: element [a, c*64 + b*16 + d] is 16-bit word m = c*16 + d of row
    4a + b; nibble i of word m = 8u + j holds k = 32u + 8i + j."""
    quarter_n, half_k = qweight.shape
    n, k = quarter_n * 4, half_k * 2
    words = qweight.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    words = words.reshape(quarter_n, k // 64, 4, 16).permute(0, 2, 1, 3).reshape(n, k // 32, 8)
    shifts = torch.arange(0, 16, 4, dtype=torch.int32, device=qweight.device)
    nibbles = (words.unsqueeze(-1) >> shifts) & 0xF  # [n, u, j, i]
    return nibbles.permute(0, 1, 3, 2).reshape(n, k).to(torch.uint8)


def _awq_stored_groups(k: int) -> int:
    """Rows of wscales/wzeros that TinyChat's converter writes for K inputs at group 64
    (deepcompressor/backend/tinychat/utils.py ceil_num_groups: groups padded to a multiple of 16)."""
    return -(-(k // W4A16_GROUP) // 16) * 16


# ---------------------------------------------------------------------------------------------
# One layer


@dataclass(frozen=True)
class DecodedLayer:
    """One of our layers, decoded from one Nunchaku layer.

    `tensors` is in our file layout, keyed by suffix, ready for `make_layer(spec, precision)`.
    `smooth_orig` is the file's `smooth_orig` (plain [K], the layer's dtype) where it differs from
    `smooth`, else None. Nunchaku's converter writes that for attention out_proj layers, whose
    smoothing it fused into the PRODUCING layer (deepcompressor smooth_fused: the v projections
    were divided by smooth_orig / smooth, so this layer's input is the original input divided by
    it). The decoded layer computes Nunchaku's function exactly either way; code that relates it
    to the original dense model (nunchaku_import's un-fusing) needs smooth_orig."""

    spec: LayerSpec
    precision: str
    tensors: dict
    smooth_orig: torch.Tensor | None = None

    def to_module(self, device=None) -> torch.nn.Module:
        """An SVDQW4A4Linear / W4A16Linear holding these tensors."""
        dtype = self.tensors["smooth" if self.spec.kind == "w4a4" else "wscales"].dtype
        module = make_layer(self.spec, self.precision, dtype, device)
        module.load_state_dict(self.tensors)
        return module


W4A4_SUFFIXES = frozenset({"qweight", "wscales", "bias", "smooth", "smooth_orig", "lora_down", "lora_up",
                           "wtscale", "wcscales"})
W4A16_SUFFIXES = frozenset({"qweight", "wscales", "wzeros", "bias"})


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


class _Checker:
    def __init__(self, name: str, tensors: dict, allowed: frozenset):
        self.name, self.tensors = name, tensors
        unknown = sorted(set(tensors) - allowed)
        if unknown:
            self.fail(f"unexpected tensor(s) {', '.join(unknown)}; a layer of this kind holds only "
                      + ", ".join(sorted(allowed)))

    def fail(self, message: str):
        raise NunchakuFormatError(f"Nunchaku layer '{self.name}': {message}")

    def matrix(self, suffix: str, dtypes: tuple, layout: str) -> torch.Tensor:
        """A required 2-D tensor whose shape the caller derives from it."""
        t = self.tensors.get(suffix)
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        if t is None:
            self.fail(f"tensor '{suffix}' is missing (expected {want} {layout})")
        if t.ndim != 2 or t.dtype not in dtypes:
            self.fail(f"tensor '{suffix}' is {_describe(t)}, expected {want} {layout}")
        return t

    def get(self, suffix: str, shape: tuple, dtypes: tuple, required: bool = True):
        t = self.tensors.get(suffix)
        if t is None:
            if required:
                want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
                self.fail(f"tensor '{suffix}' is missing (expected {want} {list(shape)})")
            return None
        if tuple(t.shape) != tuple(shape) or t.dtype not in dtypes:
            want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
            self.fail(f"tensor '{suffix}' is {_describe(t)}, expected {want} {list(shape)}")
        return t


def _padded(n: int, tile: int) -> int:
    return -(-n // tile) * tile


def _features(check: _Checker, what: str, stored: int, declared, tile: int) -> int:
    if declared is None:
        return stored
    if _padded(declared, tile) != stored:
        check.fail(f"{what} {declared} does not fit the stored {stored} (Nunchaku pads to a multiple of {tile})")
    return declared


def _strip_rank_padding(down: torch.Tensor, up: torch.Tensor):
    """Drop trailing rank components that are zero in BOTH factors: pack_lowrank_weight's padding
    (zeros up to a multiple of 16). They contribute nothing, so dropping them keeps the function; a
    component that is zero in only one factor is kept, since it is not padding."""
    keep = down.shape[0]
    while keep > 0 and not down[keep - 1].any() and not up[:, keep - 1].any():
        keep -= 1
    return down[:keep].contiguous(), up[:, :keep].contiguous()


def decode_w4a4(tensors: dict, precision: str, *, act_unsigned: bool = False, in_features: int | None = None,
                out_features: int | None = None, name: str = "?") -> DecodedLayer:
    """One Nunchaku SVDQW4A4Linear (suffix -> tensor) -> our w4a4 layer.

    nvfp4: Nunchaku's `wtscale` becomes our alpha `wtscale` and its per-channel `wcscales` our
    `wcscales`, both converted to fp32, which is exact (they are stored in 16 bits); absent, they
    are 1. int4: our format has neither, so both must be 1.

    `act_unsigned` is not in Nunchaku's files: it is true for int4 MLP down projections (mlp_fc2,
    mlp_context_fc2), which the name map says. in/out_features are the true K and N (Nunchaku
    stores them padded to 128); by default, the stored ones."""
    if precision not in GROUP_SIZE:
        raise NunchakuFormatError(f"Nunchaku layer '{name}': unknown precision {precision!r}; known: int4, nvfp4")
    check = _Checker(name, tensors, W4A4_SUFFIXES)
    qweight = check.matrix("qweight", (torch.int8, torch.uint8), "[Np, Kp/2]")
    if qweight.shape[0] % TILE or (2 * qweight.shape[1]) % TILE:
        check.fail(f"tensor 'qweight' is {_describe(qweight)}, expected int8 [Np, Kp/2] with Np and Kp "
                   f"multiples of {TILE}")
    n_pad, k_pad = qweight.shape[0], 2 * qweight.shape[1]
    K = _features(check, "in_features", k_pad, in_features, TILE)
    N = _features(check, "out_features", n_pad, out_features, TILE)
    group = GROUP_SIZE[precision]
    if K % group:
        check.fail(f"in_features {K} is not a multiple of the {precision} group size {group}")
    if act_unsigned and precision != "int4":
        check.fail("an unsigned (shifted) input exists for int4 only; Nunchaku's nvfp4 MLP down projections are signed")

    smooth = check.get("smooth", (k_pad,), COMPUTE_DTYPES)
    dtype = smooth.dtype
    if precision == "int4":
        wscales = check.get("wscales", (k_pad // INT4_GROUP, n_pad), (dtype,))
    else:
        wscales = check.get("wscales", (k_pad // NVFP4_GROUP, n_pad), (torch.float8_e4m3fn,))
    bias = check.get("bias", (n_pad,), (dtype,), required=act_unsigned)
    smooth_orig = check.get("smooth_orig", (k_pad,), (dtype,), required=False)
    wcscales = check.get("wcscales", (n_pad,), (dtype,), required=False)
    wtscale = tensors.get("wtscale")
    if wtscale is not None and (wtscale.numel() != 1 or wtscale.dtype not in (*COMPUTE_DTYPES, torch.float32)):
        check.fail(f"tensor 'wtscale' is {_describe(wtscale)}, expected one 16- or 32-bit float")
    has_down, has_up = "lora_down" in tensors, "lora_up" in tensors
    if has_down != has_up:
        check.fail(f"tensor '{'lora_up' if has_down else 'lora_down'}' is missing: the low-rank branch needs both")
    if has_down:
        lora_down = check.matrix("lora_down", (dtype,), f"[{k_pad}, rank] with rank a multiple of {RANK_TILE}")
        rank_pad = lora_down.shape[1]
        if lora_down.shape[0] != k_pad or rank_pad % RANK_TILE:
            check.fail(f"tensor 'lora_down' is {_describe(lora_down)}, expected [{k_pad}, rank] with rank a "
                       f"multiple of {RANK_TILE}")
        lora_up = check.get("lora_up", (n_pad, rank_pad), (dtype,))
        down, up = _strip_rank_padding(_lowrank(lora_down, down=True)[:, :K], _lowrank(lora_up, down=False)[:N])
    else:
        down, up = torch.zeros(0, K, dtype=dtype), torch.zeros(N, 0, dtype=dtype)

    alpha = torch.ones((), dtype=torch.float32) if wtscale is None else wtscale.float().reshape(())
    channel_scales = torch.ones(N) if wcscales is None else _channel_vector(wcscales)[:N].float()
    if precision == "int4":
        # GEMM_W4A4 asserts alpha == 1 for int4 (gemm_w4a4_launch_impl.cuh), and our int4 format has
        # no per-channel scale: folding one into the bf16 group scales would round them.
        if alpha.item() != 1.0:
            check.fail(f"an int4 layer with wtscale {alpha.item()} (Nunchaku's int4 kernel requires 1)")
        if not bool((channel_scales == 1).all()):
            check.fail("an int4 layer with per-channel 'wcscales' other than 1: our int4 format has no per-channel "
                       "output scale and folding it into the group scales would round them")

    codes = _w4a4_nibbles(qweight)[:N, :K]
    if precision == "int4":
        scales = _group_scales(wscales)[: K // INT4_GROUP, :N]
    else:
        scales = _micro_scales(wscales)[: K // NVFP4_GROUP, :N]
    smooth_plain = _channel_vector(smooth)[:K].contiguous()
    orig = None if smooth_orig is None else _channel_vector(smooth_orig)[:K].contiguous()
    out = {
        "qweight": pack_4bit(codes),
        "wscales": scales.contiguous(),
        "smooth": smooth_plain,
        "lora_down": down,
        "lora_up": up,
    }
    if precision == "nvfp4":
        out["wtscale"] = alpha
        out["wcscales"] = channel_scales.contiguous()
    if bias is not None:
        out["bias"] = _channel_vector(bias)[:N].contiguous()
    spec = LayerSpec("w4a4", K, N, bias is not None, down.shape[0], act_unsigned)
    return DecodedLayer(spec, precision, out, None if orig is None or torch.equal(orig, smooth_plain) else orig)


def decode_w4a16(tensors: dict, *, adanorm_splits: int, in_features: int | None = None,
                 out_features: int | None = None, name: str = "?") -> DecodedLayer:
    """One Nunchaku AWQW4A16Linear (suffix -> tensor) -> our w4a16 layer.

    adanorm_splits is 6 for a double block's norm1(.context).linear (AdaLayerNormZero: shift, scale,
    gate for attention, then for the MLP), 3 for a single block's norm.linear, 1 for a plain
    linear. Nunchaku interleaves the rows of such a layer (its row i*S + s is chunk s, row i) and
    adds 1 to the bias of the scale chunks (s = 1 and S - 2), so that its kernels compute
    (scale) * x rather than (1 + scale) * x. ComfyUI's modulation adds the 1 itself, so this
    returns the rows in chunk order and subtracts the 1 again: in fp32, rounded once to the
    bias dtype, which is exact wherever the stored value is >= 0.5 (docs/nunchaku-format.md)."""
    check = _Checker(name, tensors, W4A16_SUFFIXES)
    qweight = check.matrix("qweight", (torch.int32,), "[N/4, K/2]")
    if (2 * qweight.shape[1]) % W4A16_GROUP:
        check.fail(f"tensor 'qweight' is {_describe(qweight)}, expected int32 [N/4, K/2] with K a multiple of "
                   f"{W4A16_GROUP}")
    N, K = 4 * qweight.shape[0], 2 * qweight.shape[1]
    if (in_features is not None and in_features != K) or (out_features is not None and out_features != N):
        check.fail(f"stored shape is {N}x{K} (out x in), expected {out_features}x{in_features}")
    if adanorm_splits < 1 or N % adanorm_splits:
        check.fail(f"out_features {N} cannot be split into {adanorm_splits} adaLN chunks")
    groups = K // W4A16_GROUP
    # K/64 rows, or TinyChat's padded count; anything else is reported against K/64.
    stored = groups
    if "wscales" in tensors and tensors["wscales"].ndim == 2 and tensors["wscales"].shape[0] == _awq_stored_groups(K):
        stored = _awq_stored_groups(K)
    wscales = check.get("wscales", (stored, N), COMPUTE_DTYPES)
    dtype = wscales.dtype
    wzeros = check.get("wzeros", (stored, N), (dtype,))
    bias = check.get("bias", (N,), (dtype,), required=adanorm_splits > 1)

    S = adanorm_splits

    def chunk_order_rows(t):  # [N, ...] with row i*S + s -> row s*(N/S) + i
        return t.reshape(N // S, S, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    def chunk_order_cols(t):  # [G, N], the same on the last dimension
        return t.reshape(t.shape[0], N // S, S).transpose(1, 2).reshape(t.shape)

    out = {
        "qweight": pack_4bit(chunk_order_rows(_awq_codes(qweight))),
        "wscales": chunk_order_cols(wscales[:groups]).contiguous(),
        "wzeros": chunk_order_cols(wzeros[:groups]).contiguous(),
    }
    if bias is not None:
        b = chunk_order_rows(bias).float().reshape(S, N // S)
        if S > 1:
            for s in sorted({1, S - 2}):  # deepcompressor: delta[1] = delta[-2] = 1
                b[s] -= 1.0
        out["bias"] = b.reshape(N).to(dtype)
    return DecodedLayer(LayerSpec("w4a16", K, N, bias is not None), "int4", out)


# ---------------------------------------------------------------------------------------------
# Names: Nunchaku's (diffusers-style, nunchaku/models/transformers/transformer_flux_v2.py
# convert_flux_state_dict) -> ComfyUI's comfy.ldm.flux (checked against comfy/utils.py
# flux_to_diffusers and comfy/ldm/flux/layers.py).

# How a quantized layer is decoded: which decode function and with what.
W4A4 = "w4a4"
W4A4_GELU_INPUT = "w4a4_gelu_input"  # an MLP down projection: unsigned (shifted) input in int4 files
ADANORM_ZERO = "adanorm_zero"  # W4A16, 6 interleaved chunks (shift, scale, gate) x (attention, MLP)
ADANORM_SINGLE = "adanorm_single"  # W4A16, 3 interleaved chunks (shift, scale, gate)
ADANORM_SPLITS = {ADANORM_ZERO: 6, ADANORM_SINGLE: 3}

# A slice bound as (multiple of hidden_size, multiple of mlp_hidden_dim).
_ZERO, _H, _3H, _3H_M, _H_M = (0, 0), (1, 0), (3, 0), (3, 1), (1, 1)

# transformer_blocks.<i>.<layer> -> double_blocks.<i>.<module>
DOUBLE_BLOCK_LAYERS = {
    "qkv_proj": ("img_attn.qkv", W4A4, None),
    "qkv_proj_context": ("txt_attn.qkv", W4A4, None),
    "out_proj": ("img_attn.proj", W4A4, None),
    "out_proj_context": ("txt_attn.proj", W4A4, None),
    "mlp_fc1": ("img_mlp.0", W4A4, None),
    "mlp_fc2": ("img_mlp.2", W4A4_GELU_INPUT, None),
    "mlp_context_fc1": ("txt_mlp.0", W4A4, None),
    "mlp_context_fc2": ("txt_mlp.2", W4A4_GELU_INPUT, None),
    "norm1.linear": ("img_mod.lin", ADANORM_ZERO, None),
    "norm1_context.linear": ("txt_mod.lin", ADANORM_ZERO, None),
}
# single_transformer_blocks.<i>.<layer> -> single_blocks.<i>.<module>, optionally a slice of it:
# linear1 = [qkv; mlp_in] along its output rows, linear2 = [attn_out, mlp_out] along its input columns.
SINGLE_BLOCK_LAYERS = {
    "qkv_proj": ("linear1", W4A4, ("rows", _ZERO, _3H)),
    "mlp_fc1": ("linear1", W4A4, ("rows", _3H, _3H_M)),
    "out_proj": ("linear2", W4A4, ("cols", _ZERO, _H)),
    "mlp_fc2": ("linear2", W4A4_GELU_INPUT, ("cols", _H, _H_M)),
    "norm.linear": ("modulation.lin", ADANORM_SINGLE, None),
}
# Dense tensors inside blocks (RMSNorm scales of the q/k normalization).
DOUBLE_BLOCK_DENSE = {
    "norm_q.weight": "img_attn.norm.query_norm.scale",
    "norm_k.weight": "img_attn.norm.key_norm.scale",
    "norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
SINGLE_BLOCK_DENSE = {
    "norm_q.weight": "norm.query_norm.scale",
    "norm_k.weight": "norm.key_norm.scale",
}
# Dense modules outside the blocks; each has .weight and .bias.
TOP_LEVEL_DENSE = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "proj_out": "final_layer.linear",
}
# diffusers' AdaLayerNormContinuous chunks its projection as (scale, shift); ComfyUI's LastLayer as
# (shift, scale): the two halves of the output rows (weight rows and bias) swap.
SWAP_HALVES = frozenset({"norm_out.linear"})


@dataclass(frozen=True)
class Target:
    """Where one quantized Nunchaku layer goes in ComfyUI's FLUX model."""

    module: str  # ComfyUI module name, e.g. "single_blocks.3.linear1"
    role: str  # W4A4, W4A4_GELU_INPUT, ADANORM_ZERO or ADANORM_SINGLE
    slice: tuple | None  # (module, "rows" | "cols", start, stop), or None for the whole module

    def act_unsigned(self, precision: str) -> bool:
        """Nunchaku shifts the GELU output to unsigned for int4 only (transformer_flux_v2.py,
        attention.py: act_unsigned = precision != "nvfp4")."""
        return self.role == W4A4_GELU_INPUT and precision == "int4"

    @property
    def adanorm_splits(self) -> int:
        return ADANORM_SPLITS.get(self.role, 1)


def _block(name: str):
    """'transformer_blocks.3.mlp_fc2' -> ('transformer_blocks', 3, 'mlp_fc2'), else None."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] in ("transformer_blocks", "single_transformer_blocks") and parts[1].isdigit():
        return parts[0], int(parts[1]), parts[2]
    return None


def comfy_target(layer: str, hidden_size: int, mlp_hidden_dim: int) -> Target:
    """Nunchaku quantized layer name (e.g. 'single_transformer_blocks.0.mlp_fc1') -> Target."""
    block = _block(layer)
    table = None
    if block is not None:
        table = DOUBLE_BLOCK_LAYERS if block[0] == "transformer_blocks" else SINGLE_BLOCK_LAYERS
    if block is None or block[2] not in table:
        raise NunchakuFormatError(f"'{layer}' is not a quantized FLUX layer this importer knows; known per block: "
                                  f"transformer_blocks.<i>.{{{', '.join(DOUBLE_BLOCK_LAYERS)}}} and "
                                  f"single_transformer_blocks.<i>.{{{', '.join(SINGLE_BLOCK_LAYERS)}}}")
    kind, index, local = block
    prefix = f"{'double_blocks' if kind == 'transformer_blocks' else 'single_blocks'}.{index}"
    module, role, part = table[local]
    module = f"{prefix}.{module}"
    if part is None:
        return Target(module, role, None)
    axis, start, stop = part
    bound = lambda c: c[0] * hidden_size + c[1] * mlp_hidden_dim  # noqa: E731
    return Target(module, role, (module, axis, bound(start), bound(stop)))


def comfy_dense_key(key: str) -> tuple:
    """Nunchaku dense tensor name -> (ComfyUI state-dict key, swap_halves). swap_halves: the
    tensor's first dimension holds (scale, shift) halves that ComfyUI wants as (shift, scale)."""
    block = _block(key)
    if block is not None:
        kind, index, local = block
        table, prefix = ((DOUBLE_BLOCK_DENSE, "double_blocks") if kind == "transformer_blocks"
                         else (SINGLE_BLOCK_DENSE, "single_blocks"))
        if local in table:
            return f"{prefix}.{index}.{table[local]}", False
    else:
        module, _, suffix = key.rpartition(".")
        if module in TOP_LEVEL_DENSE and suffix in ("weight", "bias"):
            return f"{TOP_LEVEL_DENSE[module]}.{suffix}", module in SWAP_HALVES
    raise NunchakuFormatError(f"'{key}' is not a dense FLUX tensor this importer knows")


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(scale, shift) halves along dim 0 -> (shift, scale)."""
    first, second = t.chunk(2, dim=0)
    return torch.cat((second, first), dim=0)


def split_layer_key(key: str) -> tuple:
    """'transformer_blocks.0.qkv_proj.qweight' -> ('transformer_blocks.0.qkv_proj', 'qweight') for a
    quantized layer's tensor, else (None, None)."""
    layer, _, suffix = key.rpartition(".")
    block = _block(layer)
    if block is None or suffix not in W4A4_SUFFIXES | W4A16_SUFFIXES:
        return None, None
    table = DOUBLE_BLOCK_LAYERS if block[0] == "transformer_blocks" else SINGLE_BLOCK_LAYERS
    return (layer, suffix) if block[2] in table else (None, None)


# ---------------------------------------------------------------------------------------------
# Header: how a Nunchaku file says what it is.
#
# Single file (nunchaku/merge_safetensors.py writes these; model loaders read them): safetensors
# metadata `quantization_config` (JSON: {"method": "svdquant", "weight": {"dtype": "int4" |
# "fp4_e2m1_all", "group_size": 64 | 16, ...}, "activation": {...}, optionally "rank"}),
# `model_class` ("NunchakuFluxTransformer2dModel"), `config` (diffusers config.json text) and
# `comfy_config` (JSON: {"model_class": "Flux" | "FluxSchnell", "model_config": {ComfyUI Flux args}}).
# Folder (older): transformer_blocks.safetensors + unquantized_layers.safetensors + comfy_config.json
# (+ config.json), no metadata; the precision is nvfp4 iff a tensor is float8 (merge_safetensors.py).

NUNCHAKU_METADATA_KEYS = ("quantization_config", "model_class", "comfy_config", "config")
FOLDER_FILES = ("transformer_blocks.safetensors", "unquantized_layers.safetensors")
_PRECISIONS = {("int4", 64): "int4", ("fp4_e2m1_all", 16): "nvfp4"}


@dataclass(frozen=True)
class NunchakuHeader:
    precision: str  # "int4" or "nvfp4"
    rank: int | None  # quantization_config's "rank" if present, else the most common stored lora rank
    model_class: str | None  # Nunchaku's class name, e.g. "NunchakuFluxTransformer2dModel"
    comfy_model_class: str | None  # "Flux" or "FluxSchnell" (comfy.supported_models)
    comfy_model_config: dict  # ComfyUI Flux constructor arguments, from comfy_config
    diffusers_config: dict  # from config


def is_nunchaku_metadata(meta: dict) -> bool:
    """Whether safetensors metadata looks like a Nunchaku checkpoint's."""
    return "quantization_config" in meta or str(meta.get("model_class", "")).startswith("Nunchaku")


def _json(meta: dict, key: str, where: str) -> dict:
    if key not in meta or meta[key] in (None, ""):
        return {}
    try:
        value = json.loads(meta[key])
    except ValueError as e:
        raise NunchakuFormatError(f"{where}: metadata '{key}' is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise NunchakuFormatError(f"{where}: metadata '{key}' must be a JSON object, got {type(value).__name__}")
    return value


def _precision_from_config(qc: dict, where: str) -> str:
    weight = qc.get("weight") if isinstance(qc.get("weight"), dict) else {}
    key = (weight.get("dtype"), weight.get("group_size"))
    if qc.get("method", "svdquant") != "svdquant" or key not in _PRECISIONS:
        raise NunchakuFormatError(
            f"{where}: unknown quantization_config {json.dumps(qc, sort_keys=True)}; this importer reads SVDQuant "
            "weights {'dtype': 'int4', 'group_size': 64} (int4) or {'dtype': 'fp4_e2m1_all', 'group_size': 16} (nvfp4)")
    return _PRECISIONS[key]


def stored_rank(tensor_specs: dict) -> int | None:
    """The most common rank of the stored lora_down tensors ([Kp, rank]) in name -> (shape, dtype)-like specs."""
    ranks = [tuple(s.shape)[1] for k, s in tensor_specs.items() if k.endswith(".lora_down") and len(s.shape) == 2]
    return max(set(ranks), key=ranks.count) if ranks else None


def read_nunchaku_header(meta: dict, tensor_specs: dict, where: str = "checkpoint") -> NunchakuHeader:
    """Parse a Nunchaku checkpoint's metadata. tensor_specs (name -> object with .shape and .dtype,
    e.g. format.read_header's) decide what the metadata leaves open: the precision of a folder
    checkpoint, the rank of a file whose quantization_config has none."""
    qc = _json(meta, "quantization_config", where)
    if qc:
        precision = _precision_from_config(qc, where)
    elif "quantization_config" in meta:
        raise NunchakuFormatError(f"{where}: metadata 'quantization_config' is empty")
    else:
        precision = "nvfp4" if any(s.dtype == torch.float8_e4m3fn for s in tensor_specs.values()) else "int4"
    model_class = meta.get("model_class")
    if model_class is not None and "flux" not in model_class.lower():
        raise NunchakuFormatError(f"{where}: Nunchaku model_class {model_class!r} is not a FLUX model; this importer "
                                  "reads FLUX.1 checkpoints only")
    comfy = _json(meta, "comfy_config", where)
    comfy_class = comfy.get("model_class")
    if comfy_class is not None and comfy_class not in ("Flux", "FluxSchnell"):
        raise NunchakuFormatError(f"{where}: comfy_config model_class {comfy_class!r} is not Flux or FluxSchnell")
    rank = qc.get("rank") if isinstance(qc.get("rank"), int) else stored_rank(tensor_specs)
    return NunchakuHeader(precision, rank, model_class, comfy_class, comfy.get("model_config", {}),
                          _json(meta, "config", where))


def folder_metadata(folder) -> dict:
    """The older folder form -> the metadata a single file would carry (comfy_config, config), read
    from comfy_config.json and config.json where present. Raises if the two safetensors are missing."""
    missing = [f for f in FOLDER_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise NunchakuFormatError(f"{folder}: not a Nunchaku model folder: {', '.join(missing)} missing")
    meta = {}
    for key, filename in (("comfy_config", "comfy_config.json"), ("config", "config.json")):
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                meta[key] = f.read()
    return meta
