"""The FLUX.1 layer map: which linears of ComfyUI's FLUX model (comfy.ldm.flux.model.Flux) are
quantized, and how.

Names are ComfyUI's FLUX state-dict names without the "diffusion_model." prefix, so a checkpoint's
dense tensors load into ComfyUI's own model unchanged and LoRA keys that ComfyUI maps to
"<name>.weight" find our quantized layers. `model_config` is the keyword arguments of
comfy.ldm.flux.model.Flux as plain JSON.

Per block (h = hidden_size, m = int(h * mlp_ratio)):
  double_blocks.i.{img,txt}_attn.qkv   W4A4           h -> 3h
  double_blocks.i.{img,txt}_attn.proj  W4A4           h -> h
  double_blocks.i.{img,txt}_mlp.0      W4A4           h -> m
  double_blocks.i.{img,txt}_mlp.2      W4A4 unsigned  m -> h   (input is GELU output, >= -0.17;
                                                               unsigned in INT4 files only)
  double_blocks.i.{img,txt}_mod.lin    W4A16          h -> 6h  (M = batch size)
  single_blocks.i.linear1              W4A4           h -> 3h + m  (q, k, v, mlp-in fused)
  single_blocks.i.linear2              W4A4           h + m -> h   (signed: its input is
                                                                    cat(attention, GELU))
  single_blocks.i.modulation.lin       W4A16          h -> 3h
Everything else (embedders, final layer, norms) stays dense.
"""
import torch

from .format import CheckpointInfo
from .layers import LayerSpec
from .numerics import GROUP_SIZE, W4A16_GROUP
from .quantize import quantize_w4a4, quantize_w4a16

FLUX1_FAMILY = "flux.1"

# Constructor arguments of comfy.ldm.flux.model.Flux that a FLUX.1 file must give.
FLUX1_REQUIRED = ("in_channels", "out_channels", "vec_in_dim", "context_in_dim", "hidden_size", "mlp_ratio",
                  "num_heads", "depth", "depth_single_blocks", "axes_dim", "theta", "patch_size", "qkv_bias",
                  "guidance_embed")
# Options of that constructor that belong to other families built from the same class (Flux.2,
# Chroma-like variants): with these set, the block structure differs from the map below.
_OTHER_FAMILY_OPTIONS = {"global_modulation": False, "mlp_silu_act": False, "yak_mlp": False, "ops_bias": True}


class ModelConfigError(ValueError):
    """A model_config this layer map does not describe; the message says what is wrong."""


def check_flux1_config(model_config: dict):
    missing = [k for k in FLUX1_REQUIRED if k not in model_config]
    if missing:
        raise ModelConfigError(f"FLUX.1 model_config lacks {', '.join(missing)}")
    for key, plain in _OTHER_FAMILY_OPTIONS.items():
        if model_config.get(key, plain) != plain:
            raise ModelConfigError(f"model_config sets {key}={model_config[key]!r}: that is not a FLUX.1 "
                                   "architecture (FLUX.1-dev/-schnell and their fine-tunes, Fill, Canny, Depth, "
                                   "Kontext, Krea)")
    h, heads = model_config["hidden_size"], model_config["num_heads"]
    if h % heads or sum(model_config["axes_dim"]) != h // heads:
        raise ModelConfigError(f"hidden_size {h}, num_heads {heads} and axes_dim {model_config['axes_dim']} "
                               "do not fit together (sum(axes_dim) must be hidden_size / num_heads)")


def flux1_layer_specs(model_config: dict, rank: int, precision: str = "int4") -> dict:
    """name -> LayerSpec of every quantized linear of a FLUX.1 model. The MLP output linears take
    the shifted unsigned input only in INT4 (E2M1 codes are signed)."""
    check_flux1_config(model_config)
    h = model_config["hidden_size"]
    m = int(h * model_config["mlp_ratio"])
    qkv_bias = bool(model_config["qkv_bias"])

    def w4a4(k, n, bias=True, act_unsigned=False):
        return LayerSpec("w4a4", k, n, bias, rank, act_unsigned)

    specs = {}
    for i in range(model_config["depth"]):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            specs[f"{p}_attn.qkv"] = w4a4(h, 3 * h, bias=qkv_bias)
            specs[f"{p}_attn.proj"] = w4a4(h, h)
            specs[f"{p}_mlp.0"] = w4a4(h, m)
            specs[f"{p}_mlp.2"] = w4a4(m, h, act_unsigned=precision == "int4")
            specs[f"{p}_mod.lin"] = LayerSpec("w4a16", h, 6 * h, True)
    for i in range(model_config["depth_single_blocks"]):
        p = f"single_blocks.{i}"
        specs[f"{p}.linear1"] = w4a4(h, 3 * h + m)
        specs[f"{p}.linear2"] = w4a4(h + m, h)
        specs[f"{p}.modulation.lin"] = LayerSpec("w4a16", h, 3 * h, True)
    return specs


def check_flux1_checkpoint(info: CheckpointInfo):
    """A file's declared linears must be FLUX.1 linears with the shapes its model_config implies: a
    whole layer as the map says, a split linear (docs/format.md) of w4a4 parts that together take
    the linear's inputs and give its outputs (rows: out_features summed; cols: in_features summed)."""
    if info.model_family != FLUX1_FAMILY:
        raise ModelConfigError(f"model family {info.model_family!r} is not supported; this version runs "
                               f"{FLUX1_FAMILY!r}")
    known = flux1_layer_specs(info.model_config, info.rank)
    for name, parts in info.modules().items():
        want = known.get(name)
        if want is None:
            raise ModelConfigError(f"layer '{name}' is not a quantizable linear of this FLUX.1 model")
        if "" in parts:
            spec = parts[""]
            if (spec.kind, spec.in_features, spec.out_features) != (want.kind, want.in_features, want.out_features):
                raise ModelConfigError(f"layer '{name}' is declared {spec.kind} {spec.in_features}->"
                                       f"{spec.out_features}; this FLUX.1 config makes it {want.kind} "
                                       f"{want.in_features}->{want.out_features}")
            continue
        if want.kind != "w4a4":
            raise ModelConfigError(f"split linear '{name}': this FLUX.1 config makes it {want.kind}; only "
                                   "w4a4 linears can be split")
        not_w4a4 = sorted(part for part, spec in parts.items() if spec.kind != "w4a4")
        if not_w4a4:
            raise ModelConfigError(f"split linear '{name}': parts {not_w4a4} are not w4a4; only w4a4 layers "
                                   "can be split")
        mode = next(iter(parts.values())).part[0]
        if mode == "rows":
            in_features = next(iter(parts.values())).in_features
            out_features = sum(spec.out_features for spec in parts.values())
        else:
            in_features = sum(spec.in_features for spec in parts.values())
            out_features = next(iter(parts.values())).out_features
        if (in_features, out_features) != (want.in_features, want.out_features):
            raise ModelConfigError(f"split linear '{name}': its parts ({', '.join(sorted(parts))}, split by "
                                   f"{mode}) compute {in_features}->{out_features}; this FLUX.1 config makes it "
                                   f"{want.in_features}->{want.out_features}")


@torch.no_grad()
def quantize_flux1_state_dict(state_dict: dict, model_config: dict, *, rank=32, precision="int4",
                              dtype=torch.bfloat16, smooth: dict = None):
    """Dense ComfyUI FLUX.1 state dict (names without "diffusion_model.") -> (CheckpointInfo, tensors)
    ready for nunchaku_ext.format.save_checkpoint. Every mapped linear is quantized with the minimal
    quantizer (SVD branch + round-to-nearest residual; `smooth` maps a layer name to its smoothing
    vector); other tensors are kept dense in `dtype`."""
    specs = flux1_layer_specs(model_config, rank, precision)
    for name, spec in specs.items():
        group = GROUP_SIZE[precision] if spec.kind == "w4a4" else W4A16_GROUP
        if spec.in_features % group:
            raise ModelConfigError(f"layer '{name}' has {spec.in_features} input features, not a multiple of "
                                   f"the {precision if spec.kind == 'w4a4' else 'w4a16'} group size {group}")
    smooth = smooth or {}
    tensors, owned = {}, set()
    for name, spec in specs.items():
        weight, bias = state_dict[f"{name}.weight"], state_dict.get(f"{name}.bias")
        owned.update({f"{name}.weight", f"{name}.bias"})
        if spec.kind == "w4a4":
            layer = quantize_w4a4(weight.float(), None if bias is None else bias.float(), rank,
                                  precision=precision, smooth=smooth.get(name), act_unsigned=spec.act_unsigned,
                                  dtype=dtype)
        else:
            layer = quantize_w4a16(weight.float(), None if bias is None else bias.float(), dtype=dtype)
        tensors.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
        # quantize_w4a4 gives an unsigned-input layer a bias even when the dense layer had none.
        specs[name] = layer.spec()
    for key, value in state_dict.items():
        if key not in owned:
            tensors[key] = value.to(dtype) if value.is_floating_point() else value
    info = CheckpointInfo(precision=precision, rank=rank, dtype=dtype, model_family=FLUX1_FAMILY,
                          model_config=dict(model_config), layers=specs)
    return info, tensors
