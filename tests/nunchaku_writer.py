"""A test-side writer of Nunchaku's SVDQuant FLUX.1 checkpoints, shared by the tests of the layout
decoders (test_nunchaku_layout.py) and of the whole-checkpoint importer (test_nunchaku_import.py).

The layer writer packs plain tensors the way Nunchaku's published converters do, read from
nunchaku/lora/flux/packer.py (NunchakuWeightPacker: pack_weight, pack_scale, pack_micro_scale,
pack_lowrank_weight) and deepcompressor/backend/{nunchaku,tinychat}/utils.py (padding, the
per-tensor / per-channel scales, TinyChat's pack_w4, the adaLN row interleave and +1, the shift
compensation of MLP down projections). It shares no code with nunchaku_ext.nunchaku_layout or
nunchaku_ext.nunchaku_import: it goes FORWARD (plain -> packed) with the packers' own
reshape/permute recipes, the decoder goes back. Its scale orders are pinned to the lane tables
printed in packer.py's comments (test_nunchaku_layout.py).

The model writer (write_flux) builds a random FLUX.1 checkpoint as deepcompressor's converter
(backend/nunchaku/convert.py) and nunchaku/merge_safetensors.py write one, names from that
converter's local_name_map and ComfyUI's comfy/utils.py flux_to_diffusers, and keeps the ORIGINAL
dense model it stands for, before the converter fused the attention smoothing into v.
"""
import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file

from nunchaku_ext.numerics import UNSIGNED_SHIFT

E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float64)
BF16 = torch.bfloat16


# ---------------------------------------------------------------------------------------------
# The writer: Nunchaku's layout, forward.


def ceil_div(a, b):
    return -(-a // b)


def pad_to(t, multiples, fill=0):
    """Pad each dim i of t up to a multiple of multiples[i] (deepcompressor utils.pad)."""
    shape = [ceil_div(s, m) * m for s, m in zip(t.shape, multiples)]
    out = torch.full(shape, fill, dtype=t.dtype)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def nk_pack_codes(codes):
    """pack_weight(bits=4, warp_n=128): int codes [N, K] -> int8 [N, K/2]."""
    n, k = codes.shape
    v = codes.to(torch.int64).reshape(n // 128, 8, 2, 8, 1, k // 64, 1, 2, 4, 8)
    v = v.permute(0, 5, 6, 1, 3, 8, 2, 7, 4, 9) & 0xF
    words = (v << (4 * torch.arange(8))).sum(-1)  # 8 nibbles of one 32-bit register, k ascending
    little_endian = torch.stack([(words >> (8 * b)) & 0xFF for b in range(4)], dim=-1)
    return little_endian.to(torch.uint8).reshape(n, k // 2).view(torch.int8)


def nk_pack_scale(per_row):
    """pack_scale(group 64 or per-channel, warp_n=128): [N, G] -> packed [G, N] (G=1: a vector [N])."""
    n, g = per_row.shape
    packed = per_row.reshape(n // 128, 1, 8, 2, 4, 2, g).permute(0, 6, 1, 2, 4, 3, 5).contiguous()
    return packed.view(-1) if g == 1 else packed.view(g, n)


def nk_pack_micro_scale(per_row):
    """pack_micro_scale(group 16, warp_n=128): e4m3 [N, K/16] -> packed [K/16, N]."""
    n, g = per_row.shape
    raw = per_row.view(torch.uint8).reshape(n // 128, 1, 4, 4, 8, g // 4, 4)
    return raw.permute(0, 5, 1, 4, 3, 2, 6).contiguous().view(torch.float8_e4m3fn).view(g, n)


def nk_pack_lowrank(w, down):
    """pad_lowrank_weight + pack_lowrank_weight: down [r, K] -> [Kp, Rp]; up [N, r] -> [Np, Rp]."""
    w = pad_to(w, (16, 128) if down else (128, 16))
    if down:
        r, c = w.shape
        tiles = w.view(r // 16, 16, c // 16, 16).permute(2, 0, 1, 3)
    else:
        c, r = w.shape
        tiles = w.view(c // 16, 16, r // 16, 16).permute(0, 2, 1, 3)
    tiles = tiles.reshape(c // 16, r // 16, 2, 8, 1, 2, 4, 2).permute(0, 1, 3, 6, 2, 5, 4, 7)
    return tiles.contiguous().view(c, r)


def nk_w4a4(codes, wscales, smooth, bias, down, up, *, wtscale=None, wcscales=None, smooth_orig=None,
            scale_fill=1.0):
    """A Nunchaku W4A4 layer from plain tensors: codes [N, K] (signed ints, or E2M1 codes 0..15),
    wscales [K/g, N], smooth [K], bias [N], down [r, K] (already over smooth), up [N, r]."""
    n, k = codes.shape
    fp4 = wscales.dtype == torch.float8_e4m3fn
    codes_p = pad_to(codes.to(torch.int32), (128, 128))
    if fp4:
        scales_p = pad_to(wscales.T.contiguous().view(torch.uint8), (128, 8), fill=0x38).view(torch.float8_e4m3fn)
        packed_scales = nk_pack_micro_scale(scales_p)
    else:
        packed_scales = nk_pack_scale(pad_to(wscales.T, (128, 2), fill=scale_fill))
    sd = {
        "qweight": nk_pack_codes(codes_p),
        "wscales": packed_scales,
        "bias": nk_pack_scale(pad_to(bias[:, None], (128, 1))),
        "smooth": nk_pack_scale(pad_to(smooth[:, None], (128, 1), fill=scale_fill)),
        "smooth_orig": nk_pack_scale(pad_to((smooth if smooth_orig is None else smooth_orig)[:, None], (128, 1),
                                            fill=scale_fill)),
        "lora_down": nk_pack_lowrank(down, down=True),
        "lora_up": nk_pack_lowrank(up, down=False),
    }
    if wtscale is not None:
        sd["wtscale"] = torch.tensor([wtscale], dtype=BF16)
    if wcscales is not None:
        sd["wcscales"] = nk_pack_scale(pad_to(wcscales[:, None], (128, 1), fill=scale_fill))
    return sd


def nk_w4a16(codes, scales, bias, splits):
    """deepcompressor convert_to_nunchaku_w4x16_linear_weight with zero=7 (pre-scaled) from codes
    [N, K] in 0..15 and scales [N, K/64] (the dense weight is (code - 7) * scale): interleave the
    adaLN chunks, add 1 to the scale chunks' bias, pack like TinyChat."""
    n, k = codes.shape
    g = k // 64
    interleave = lambda t: t.reshape(splits, n // splits, *t.shape[1:]).transpose(0, 1).reshape(t.shape)  # noqa
    codes, scales, bias = interleave(codes), interleave(scales), interleave(bias[:, None])[:, 0].clone()
    if splits > 1:
        delta = torch.zeros(splits, dtype=bias.dtype)
        delta[1] = delta[-2] = 1
        bias = (bias.view(n // splits, splits) + delta).reshape(n)
    zeros = (7 * scales.float()).to(BF16).neg()  # zero_pre_scaled: zero * scale, stored negated
    # TinyChat pack_w4: 32 codes -> 8 16-bit words (word j holds codes j, 8+j, 16+j, 24+j in nibbles
    # 0..3), then rows in groups of 4 interleaved per 64 inputs.
    c = codes.to(torch.int32).view(-1, 4, 8)
    words = c[:, 0] | (c[:, 1] << 4) | (c[:, 2] << 8) | (c[:, 3] << 12)
    words = words.view(n // 4, 4, k // 64, 16).permute(0, 2, 1, 3).reshape(n // 4, k)
    stored_groups = ceil_div(ceil_div(g, 8), 2) * 2 * 8  # TinyChat ceil_num_groups(k, 64, 4)
    pad_rows = lambda t: torch.cat([t, torch.zeros(stored_groups - g, n, dtype=t.dtype)])  # noqa: E731
    return {
        "qweight": words.to(torch.int16).view(torch.int32),
        "wscales": pad_rows(scales.T.contiguous()),
        "wzeros": pad_rows(zeros.T.contiguous()),
        "bias": bias,
    }



# ---------------------------------------------------------------------------------------------
# A whole FLUX.1 checkpoint.

# One round to nearest bf16 (8 significant bits): relative error at most half an ulp, 2^-8.
BF16_ROUNDING = 2.0 ** -8

INT4_CONFIG = {"method": "svdquant", "weight": {"dtype": "int4", "scale_dtype": None, "group_size": 64},
               "activation": {"dtype": "int4", "scale_dtype": None, "group_size": 64}}
FP4_CONFIG = {"method": "svdquant", "weight": {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"],
                                               "group_size": 16},
              "activation": {"dtype": "fp4_e2m1_all", "scale_dtype": "fp8_e4m3_nan", "group_size": 16}}

# deepcompressor convert.py local_name_map, with the ComfyUI module each layer computes (comfy/utils.py
# flux_to_diffusers: to_q/k/v are rows h-wide of qkv, proj_mlp rows [3h, 3h+m) of linear1, proj_out
# is linear2 whose input is cat(attention, mlp)). Roles: "qkv" holds v in rows [2h, 3h); "out" is an
# attention out projection (converter: smooth_fused); "gelu" an MLP down projection.
DOUBLE_LAYERS = {  # Nunchaku layer -> (ComfyUI module under double_blocks.<i>, role)
    "qkv_proj": ("img_attn.qkv", "qkv"), "qkv_proj_context": ("txt_attn.qkv", "qkv"),
    "out_proj": ("img_attn.proj", "out"), "out_proj_context": ("txt_attn.proj", "out"),
    "mlp_fc1": ("img_mlp.0", "plain"), "mlp_fc2": ("img_mlp.2", "gelu"),
    "mlp_context_fc1": ("txt_mlp.0", "plain"), "mlp_context_fc2": ("txt_mlp.2", "gelu"),
}
DOUBLE_MODULATIONS = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"}
DOUBLE_NORMS = {"norm_q.weight": "img_attn.norm.query_norm.scale", "norm_k.weight": "img_attn.norm.key_norm.scale",
                "norm_added_q.weight": "txt_attn.norm.query_norm.scale",
                "norm_added_k.weight": "txt_attn.norm.key_norm.scale"}
SINGLE_NORMS = {"norm_q.weight": "norm.query_norm.scale", "norm_k.weight": "norm.key_norm.scale"}
TOP_LEVEL = {  # ComfyUI module -> diffusers module (flux_to_diffusers MAP_BASIC)
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
    "final_layer.linear": "proj_out",
}


@dataclass
class SourceLinear:
    """The ORIGINAL dense function of one ComfyUI linear (float64), and how far an import may be
    from it, elementwise: one bf16 rounding of each value that un-fusing the attention smoothing
    rescales, or of a bias that the file holds rounded."""

    weight: torch.Tensor  # [N, K]
    bias: torch.Tensor  # [N]
    weight_tol: torch.Tensor
    bias_tol: torch.Tensor

    @staticmethod
    def concat(parts, mode):
        """The linear that parts compute together: "rows" stacks outputs, "cols" splits the input."""
        if mode == "rows":
            return SourceLinear(*(torch.cat([getattr(p, f) for p in parts]) for f in
                                  ("weight", "bias", "weight_tol", "bias_tol")))
        return SourceLinear(torch.cat([p.weight for p in parts], 1), sum(p.bias for p in parts),
                            torch.cat([p.weight_tol for p in parts], 1), sum(p.bias_tol for p in parts))


@dataclass
class NunchakuFlux:
    config: dict  # the source model's ComfyUI Flux arguments
    precision: str  # "int4" or "nvfp4"
    tensors: dict  # Nunchaku name -> tensor
    metadata: dict  # what a single file carries
    linears: dict = field(default_factory=dict)  # ComfyUI module name -> SourceLinear
    dense: dict = field(default_factory=dict)  # ComfyUI name -> tensor as ComfyUI holds it
    fused_smoothing: dict = field(default_factory=dict)  # ComfyUI block -> the s fused into its v rows

    def save_file(self, path):
        save_file(self.tensors, str(path), metadata=self.metadata)
        return path

    def save_folder(self, path):
        """The older form (deepcompressor convert.py's output plus the configs)."""
        path.mkdir()
        blocks = {k: v for k, v in self.tensors.items() if k.startswith(("transformer_blocks.", "single_transformer_"))}
        save_file(blocks, str(path / "transformer_blocks.safetensors"))
        save_file({k: v for k, v in self.tensors.items() if k not in blocks},
                  str(path / "unquantized_layers.safetensors"))
        (path / "comfy_config.json").write_text(self.metadata["comfy_config"])
        (path / "config.json").write_text(self.metadata["config"])
        return path


def bf16_positive(g, *shape):
    return (torch.rand(*shape, generator=g) * 2 + 0.25).to(BF16)


def w4a4_layer(g, precision, n, k, rank, smooth, *, role="plain", s=None):
    """One Nunchaku W4A4 layer as deepcompressor writes it, and the original linear it computes.

    role "qkv": the converter divided the v rows [2n/3, n) by s; "out": its input smoothing s was
    fused into the v projections (smooth = 1, smooth_orig = s, lora_down not divided by s, the
    input is the original over s); "gelu": int4 takes the shifted unsigned input, the stored bias
    compensating the shift of the quantized branch."""
    up = (torch.randn(n, rank, generator=g) * 0.05).to(BF16)
    down = (torch.randn(rank, k, generator=g) * 0.05).to(BF16)
    extra = {}
    if precision == "int4":
        codes = torch.randint(-8, 8, (n, k), generator=g)
        wscales = (torch.rand(k // 64, n, generator=g) * 0.02 + 0.001).to(BF16)
        residual = codes.double() * wscales.double().T.repeat_interleave(64, dim=1)
    else:
        codes = torch.randint(0, 16, (n, k), generator=g)
        wscales = (2.0 ** torch.randint(-4, 5, (k // 16, n), generator=g).float()).to(torch.float8_e4m3fn)
        if role == "qkv":  # q, k, v with their own per-tensor scales: per-channel wcscales (convert.py)
            channel = (torch.rand(3, generator=g) * 0.01 + 0.001).to(BF16).repeat_interleave(n // 3)
            extra["wcscales"] = channel
        else:
            channel = (torch.rand(1, generator=g) * 0.01 + 0.001).to(BF16).expand(n)
            extra["wtscale"] = channel[0].item()
        residual = E2M1[codes] * wscales.double().T.repeat_interleave(16, dim=1) * channel.double()[:, None]
    file_smooth = torch.ones(k, dtype=BF16) if role == "out" else smooth
    # What the Nunchaku layer computes from its own input (the int4 shift aside).
    weight = residual / file_smooth.double() + up.double() @ down.double()
    lowrank_abs = up.double().abs() @ down.double().abs()
    weight_tol = torch.zeros(n, k, dtype=torch.float64)
    if role == "gelu" and precision == "int4":
        bias = torch.randn(n, generator=g).double() * 0.5
        shift = torch.full((k,), UNSIGNED_SHIFT, dtype=torch.float64)
        file_bias = (bias - residual / smooth.double() @ shift).to(BF16)
        bias_tol = BF16_ROUNDING * file_bias.double().abs()
    else:
        file_bias = (torch.randn(n, generator=g) * 0.5).to(BF16)
        bias, bias_tol = file_bias.double(), torch.zeros(n, dtype=torch.float64)
    if role == "out":  # original input o = s * (Nunchaku's input); the import divides lora_down by s
        weight = weight / s.double()
        weight_tol = BF16_ROUNDING * lowrank_abs / s.double()
    elif role == "qkv":  # original v rows = Nunchaku's times s; the import rescales v's factors
        v, sv = slice(2 * n // 3, n), s.double()[:, None]
        weight[v] *= sv
        bias[v] *= s.double()
        bias_tol[v] = BF16_ROUNDING * bias[v].abs()
        rescaled = lowrank_abs[v] + (residual[v].abs() / smooth.double() if precision == "int4" else 0)
        weight_tol[v] = BF16_ROUNDING * sv * rescaled
    sd = nk_w4a4(codes, wscales, file_smooth, file_bias, down, up, smooth_orig=s if role == "out" else None, **extra)
    return sd, SourceLinear(weight, bias, weight_tol, bias_tol)


def w4a16_layer(g, n, k, splits):
    """An adaLN modulation layer (deepcompressor: zero 7, scale chunks' bias + 1, rows interleaved)."""
    codes = torch.randint(0, 16, (n, k), generator=g)
    scales = (torch.rand(n, k // 64, generator=g) * 0.01 + 0.001).to(BF16)
    bias = (torch.rand(n, generator=g) - 0.5).to(BF16)
    zeros = (7 * scales.float()).to(BF16).neg()
    weight = (codes.double() * scales.double().repeat_interleave(64, dim=1)
              + zeros.double().repeat_interleave(64, dim=1))
    bias_tol = torch.zeros(splits, n // splits, dtype=torch.float64)
    bias_tol[[1, splits - 2]] = 2.0 ** -8  # bf16(b + 1) - 1: half an ulp of 1
    return (nk_w4a16(codes, scales, bias, splits),
            SourceLinear(weight, bias.double(), torch.zeros(n, k, dtype=torch.float64), bias_tol.reshape(n)))


def diffusers_config(config):
    head_dim = config["hidden_size"] // config["num_heads"]
    return {"_class_name": "FluxTransformer2DModel", "attention_head_dim": head_dim,
            "axes_dims_rope": config["axes_dim"], "guidance_embeds": config["guidance_embed"],
            "in_channels": config["in_channels"] * 4, "joint_attention_dim": config["context_in_dim"],
            "num_attention_heads": config["num_heads"], "num_layers": config["depth"],
            "num_single_layers": config["depth_single_blocks"], "patch_size": 1,
            "pooled_projection_dim": config["vec_in_dim"]}


def write_flux(config, precision, seed=0, rank=32):
    """A random FLUX.1 checkpoint in Nunchaku's layout, and the original model it stands for."""
    g = torch.Generator().manual_seed(seed)
    h = config["hidden_size"]
    m = int(h * config["mlp_ratio"])
    head_dim = h // config["num_heads"]
    out = NunchakuFlux(config, precision, {}, {})

    def put(prefix, sd):
        out.tensors.update({f"{prefix}.{k}": v for k, v in sd.items()})

    for i in range(config["depth"]):
        nk, cf = f"transformer_blocks.{i}", f"double_blocks.{i}"
        # one smoothing for both out projections (smooth.py smooth_diffusion_out_proj)
        s = out.fused_smoothing[cf] = bf16_positive(g, h)
        shapes = {"qkv": (3 * h, h), "out": (h, h), "plain": (m, h), "gelu": (h, m)}
        for layer, (module, role) in DOUBLE_LAYERS.items():
            n, k = shapes[role]
            sd, out.linears[f"{cf}.{module}"] = w4a4_layer(g, precision, n, k, rank, bf16_positive(g, k), role=role,
                                                           s=s if role in ("qkv", "out") else None)
            put(f"{nk}.{layer}", sd)
        for layer, module in DOUBLE_MODULATIONS.items():
            sd, out.linears[f"{cf}.{module}"] = w4a16_layer(g, 6 * h, h, 6)
            put(f"{nk}.{layer}", sd)
        for name, comfy in DOUBLE_NORMS.items():
            out.dense[f"{cf}.{comfy}"] = out.tensors[f"{nk}.{name}"] = torch.rand(head_dim, generator=g) + 0.5
    for i in range(config["depth_single_blocks"]):
        nk, cf = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        s = out.fused_smoothing[cf] = bf16_positive(g, h)
        attn_in = bf16_positive(g, h)  # qkv_proj and mlp_fc1 share one input smoothing (smooth_name_map)
        parts = {}
        for layer, (n, k, role, smooth) in {"qkv_proj": (3 * h, h, "qkv", attn_in), "mlp_fc1": (m, h, "plain", attn_in),
                                           "out_proj": (h, h, "out", None), "mlp_fc2": (h, m, "gelu", None)}.items():
            smooth = bf16_positive(g, k) if smooth is None else smooth
            sd, parts[layer] = w4a4_layer(g, precision, n, k, rank, smooth, role=role,
                                          s=s if role in ("qkv", "out") else None)
            put(f"{nk}.{layer}", sd)
        out.linears[f"{cf}.linear1"] = SourceLinear.concat([parts["qkv_proj"], parts["mlp_fc1"]], "rows")
        out.linears[f"{cf}.linear2"] = SourceLinear.concat([parts["out_proj"], parts["mlp_fc2"]], "cols")
        sd, out.linears[f"{cf}.modulation.lin"] = w4a16_layer(g, 3 * h, h, 3)
        put(f"{nk}.norm.linear", sd)
        for name, comfy in SINGLE_NORMS.items():
            out.dense[f"{cf}.{comfy}"] = out.tensors[f"{nk}.{name}"] = torch.rand(head_dim, generator=g) + 0.5

    patch = config["patch_size"] ** 2
    shapes = {"img_in": (h, config["in_channels"] * patch), "txt_in": (h, config["context_in_dim"]),
              "time_in.in_layer": (h, 256), "time_in.out_layer": (h, h),
              "vector_in.in_layer": (h, config["vec_in_dim"]), "vector_in.out_layer": (h, h),
              "guidance_in.in_layer": (h, 256), "guidance_in.out_layer": (h, h),
              "final_layer.adaLN_modulation.1": (2 * h, h), "final_layer.linear": (config["out_channels"] * patch, h)}
    for comfy, diffusers in TOP_LEVEL.items():
        if comfy.startswith("guidance_in") and not config["guidance_embed"]:
            continue
        weight = torch.randn(*shapes[comfy], generator=g).to(BF16)
        bias = torch.randn(shapes[comfy][0], generator=g).to(BF16)
        out.dense[f"{comfy}.weight"], out.dense[f"{comfy}.bias"] = weight, bias
        if diffusers == "norm_out.linear":  # diffusers chunks (scale, shift), ComfyUI (shift, scale)
            weight, bias = (torch.cat(t.chunk(2)[::-1]) for t in (weight, bias))
        out.tensors[f"{diffusers}.weight"], out.tensors[f"{diffusers}.bias"] = weight, bias

    qc = dict(INT4_CONFIG if precision == "int4" else FP4_CONFIG, rank=rank)
    comfy_config = {"model_class": "Flux" if config["guidance_embed"] else "FluxSchnell",
                    "model_config": dict(config, image_model="flux", disable_unet_model_creation=True)}
    out.metadata = {"quantization_config": json.dumps(qc), "model_class": "NunchakuFluxTransformer2dModel",
                    "comfy_config": json.dumps(comfy_config), "config": json.dumps(diffusers_config(config))}
    return out
