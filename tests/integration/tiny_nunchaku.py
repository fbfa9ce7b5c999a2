"""The tiny FLUX of tiny_models.py quantized the way Nunchaku's files are, written twice: in
Nunchaku's INT4 layout (tests/nunchaku_writer.py, the test-side writer that shares no code with the
importer) and in our format with the same quantized tensors.

Nunchaku's structure: a single block's linear1 is two layers (q/k/v rows and MLP rows), its
linear2 two (attention columns, signed; MLP columns, unsigned input), and the modulation linears
are W4A16 with the zero point fixed at code 7. The W4A4 layers that both formats hold whole are
taken as they are from our quantization of the same dense model.
"""
import json
import sys
from pathlib import Path

import torch

from nunchaku_ext.format import CheckpointInfo
from nunchaku_ext.layers import LayerSpec
from nunchaku_ext.numerics import pack_4bit, unpack_4bit
from nunchaku_ext.quantize import quantize_w4a4

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the writer
import nunchaku_writer as nw  # noqa: E402

BF16 = torch.bfloat16
NUNCHAKU_ZERO_CODE = 7  # deepcompressor's W4A16 modulation layers: w = (code - 7) * scale


def _nunchaku_w4a4(layer):
    """Our SVDQ W4A4 layer (or its state dict) -> the same layer in Nunchaku's packed layout."""
    t = layer if isinstance(layer, dict) else layer.state_dict()
    codes = unpack_4bit(t["qweight"], signed=True)
    return nw.nk_w4a4(codes, t["wscales"], t["smooth"], t["bias"], t["lora_down"], t["lora_up"])


def _modulation(weight, bias):
    """A W4A16 modulation linear with Nunchaku's fixed zero point: (codes [N, K] 0..15, scales
    [N, K/64] bf16, our format's tensors for the same weights)."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // 64, 64)
    scales = (groups.abs().amax(-1) / NUNCHAKU_ZERO_CODE).to(BF16)
    codes = (groups / scales.float()[..., None]).round().add(NUNCHAKU_ZERO_CODE).clamp(0, 15).to(torch.uint8)
    codes = codes.reshape(n, k)
    zeros = (NUNCHAKU_ZERO_CODE * scales.float()).to(BF16).neg()  # as the writer stores it
    ours = {"qweight": pack_4bit(codes), "wscales": scales.T.contiguous(), "wzeros": zeros.T.contiguous(),
            "bias": bias.to(BF16)}
    return codes, scales, ours


def nunchaku_tiny_flux(dense, config, info, tensors):
    """dense: the tiny FLUX's ComfyUI state dict; info, tensors: our whole-layer quantization of it
    (models.quantize_flux1_state_dict). -> (nunchaku_writer.NunchakuFlux, (CheckpointInfo, tensors)
    of our format with Nunchaku's split linears), both holding the same quantized weights."""
    h = config["hidden_size"]
    m = int(h * config["mlp_ratio"])
    rank = info.rank
    nk, ours_layers, ours = {}, {}, {}

    def whole_w4a4(nk_name, comfy_name):
        layer = {k[len(comfy_name) + 1:]: v for k, v in tensors.items() if k.rpartition(".")[0] == comfy_name}
        nk.update({f"{nk_name}.{k}": v for k, v in _nunchaku_w4a4(layer).items()})
        ours.update({f"{comfy_name}.{k}": v for k, v in layer.items()})
        ours_layers[comfy_name] = info.layers[comfy_name]

    def modulation(nk_name, comfy_name, splits):
        codes, scales, layer = _modulation(dense[f"{comfy_name}.weight"], dense[f"{comfy_name}.bias"])
        nk.update({f"{nk_name}.{k}": v for k, v in nw.nk_w4a16(codes, scales, layer["bias"], splits).items()})
        ours.update({f"{comfy_name}.{k}": v for k, v in layer.items()})
        ours_layers[comfy_name] = LayerSpec("w4a16", codes.shape[1], codes.shape[0], True)

    def part(nk_name, comfy_name, part_name, weight, bias, span, act_unsigned=False):
        layer = quantize_w4a4(weight.float(), None if bias is None else bias.float(), rank,
                              act_unsigned=act_unsigned, dtype=BF16)
        nk.update({f"{nk_name}.{k}": v for k, v in _nunchaku_w4a4(layer).items()})
        name = f"{comfy_name}.{part_name}"
        ours.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
        ours_layers[name] = LayerSpec("w4a4", layer.in_features, layer.out_features, True, rank, act_unsigned, span)

    for i in range(config["depth"]):
        for nk_local, (comfy_local, _) in nw.DOUBLE_LAYERS.items():
            whole_w4a4(f"transformer_blocks.{i}.{nk_local}", f"double_blocks.{i}.{comfy_local}")
        for nk_local, comfy_local in nw.DOUBLE_MODULATIONS.items():
            modulation(f"transformer_blocks.{i}.{nk_local}", f"double_blocks.{i}.{comfy_local}", 6)
        for nk_local, comfy_local in nw.DOUBLE_NORMS.items():
            nk[f"transformer_blocks.{i}.{nk_local}"] = tensors[f"double_blocks.{i}.{comfy_local}"]
    for i in range(config["depth_single_blocks"]):
        p, q = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        w1, b1 = dense[f"{q}.linear1.weight"], dense[f"{q}.linear1.bias"]
        part(f"{p}.qkv_proj", f"{q}.linear1", "qkv_proj", w1[:3 * h], b1[:3 * h], ("rows", 0, 3 * h))
        part(f"{p}.mlp_fc1", f"{q}.linear1", "mlp_fc1", w1[3 * h:], b1[3 * h:], ("rows", 3 * h, 3 * h + m))
        w2, b2 = dense[f"{q}.linear2.weight"], dense[f"{q}.linear2.bias"]
        # the parts' biases add up to linear2's; the unsigned MLP part's holds its shift compensation
        part(f"{p}.out_proj", f"{q}.linear2", "out_proj", w2[:, :h], b2, ("cols", 0, h))
        part(f"{p}.mlp_fc2", f"{q}.linear2", "mlp_fc2", w2[:, h:], None, ("cols", h, h + m), act_unsigned=True)
        modulation(f"{p}.norm.linear", f"{q}.modulation.lin", 3)
        for nk_local, comfy_local in nw.SINGLE_NORMS.items():
            nk[f"{p}.{nk_local}"] = tensors[f"{q}.{comfy_local}"]
    for comfy_name, nk_name in nw.TOP_LEVEL.items():
        if comfy_name.startswith("guidance_in") and not config["guidance_embed"]:
            continue
        for suffix in ("weight", "bias"):
            t = tensors[f"{comfy_name}.{suffix}"]
            if nk_name == "norm_out.linear":  # diffusers chunks (scale, shift), ComfyUI (shift, scale)
                t = torch.cat(t.chunk(2)[::-1])
            nk[f"{nk_name}.{suffix}"] = t
    owned = {f"{name}." for name in info.layers}
    ours.update({k: v for k, v in tensors.items() if not k.startswith(tuple(owned))})

    qc = dict(nw.INT4_CONFIG, rank=rank)
    comfy_config = {"model_class": "Flux" if config["guidance_embed"] else "FluxSchnell",
                    "model_config": dict(config, image_model="flux", disable_unet_model_creation=True)}
    metadata = {"quantization_config": json.dumps(qc), "model_class": "NunchakuFluxTransformer2dModel",
                "comfy_config": json.dumps(comfy_config), "config": json.dumps(nw.diffusers_config(config))}
    flux = nw.NunchakuFlux(config, "int4", {k: v.contiguous() for k, v in nk.items()}, metadata)
    split_info = CheckpointInfo(precision="int4", rank=rank, dtype=BF16, model_family=info.model_family,
                                model_config=dict(config), layers=ours_layers)
    return flux, (split_info, ours)
