"""Importing Nunchaku's layer layouts, against the independent writer in nunchaku_writer.py.

What the runtime computes with those tensors is taken from Nunchaku's C++ (src/Linear.cpp,
src/kernels/zgemm/*): the quantized branch sees (x [+ 0.171875]) / smooth, the low-rank branch sees
the raw x (also for MLP down projections: the GELU epilogue feeds lora_down before the shift), the
result is alpha * wcscales[n] * acc + bias + lora.
"""
import json

import pytest
import torch
from nunchaku_writer import (
    BF16,
    E2M1,
    FP4_CONFIG,
    INT4_CONFIG,
    nk_pack_micro_scale,
    nk_pack_scale,
    nk_w4a4,
    nk_w4a16,
)

from nunchaku_ext.layers import SVDQW4A4Linear, W4A16Linear
from nunchaku_ext.numerics import UNSIGNED_SHIFT, unpack_4bit
from nunchaku_ext.nunchaku_layout import (
    NunchakuFormatError,
    comfy_dense_key,
    comfy_target,
    decode_w4a4,
    decode_w4a16,
    folder_metadata,
    is_nunchaku_metadata,
    read_nunchaku_header,
    split_layer_key,
    swap_halves,
)


# ---------------------------------------------------------------------------------------------
# The writer against the lane tables in packer.py's comments.


def test_writer_scale_orders_match_the_packer_comments():
    channel = torch.arange(128, dtype=torch.float32).to(BF16)[:, None]
    assert nk_pack_scale(channel)[:16].float().tolist() == [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]
    assert nk_pack_scale(channel)[16:20].float().tolist() == [16, 17, 24, 25]
    micro = torch.arange(128, dtype=torch.float32).repeat_interleave(4).view(128, 4).to(torch.float8_e4m3fn)
    first = nk_pack_micro_scale(micro).view(-1).float()[0:32:4].tolist()  # group 0 of lanes 0..7
    assert first == [0, 32, 64, 96, 8, 40, 72, 104]


# ---------------------------------------------------------------------------------------------
# Source layers


def int4_source(n, k, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "codes": torch.randint(-8, 8, (n, k), generator=g),
        "wscales": (torch.rand(k // 64, n, generator=g) * 0.02 + 0.001).to(BF16),
        "smooth": (torch.rand(k, generator=g) * 2 + 0.25).to(BF16),
        "bias": torch.randn(n, generator=g).to(BF16),
        "down": (torch.randn(rank, k, generator=g) * 0.05).to(BF16),
        "up": (torch.randn(n, rank, generator=g) * 0.05).to(BF16),
    }


def dense_w4a4(src, alpha=1.0):
    """float64 W = Q(R) / smooth + up @ down, from the source's plain tensors."""
    codes = src["codes"].double()
    if src["wscales"].dtype == torch.float8_e4m3fn:
        codes = E2M1[src["codes"]]
    group = src["codes"].shape[1] // src["wscales"].shape[0]
    residual = codes * src["wscales"].double().T.repeat_interleave(group, dim=1) * alpha
    return residual / src["smooth"].double() + src["up"].double() @ src["down"].double()


@pytest.mark.parametrize("n,k,rank", [(256, 256, 32), (256, 512, 20), (200, 320, 32)])
def test_int4_layer_decodes_exactly(n, k, rank):
    src = int4_source(n, k, rank, seed=n + k + rank)
    sd = nk_w4a4(src["codes"], src["wscales"], src["smooth"], src["bias"], src["down"], src["up"])
    layer = decode_w4a4(sd, "int4", in_features=k, out_features=n, name="t")
    t = layer.tensors
    assert torch.equal(unpack_4bit(t["qweight"], signed=True).long(), src["codes"])
    for ours, theirs in (("wscales", "wscales"), ("smooth", "smooth"), ("bias", "bias"),
                         ("lora_down", "down"), ("lora_up", "up")):
        assert torch.equal(t[ours], src[theirs]), ours
    assert layer.spec.rank == rank  # the padding to 32 of rank 20 is gone
    assert layer.smooth_orig is None
    module = layer.to_module()
    assert isinstance(module, SVDQW4A4Linear) and module.precision == "int4"
    torch.testing.assert_close(module.dequantize().double(), dense_w4a4(src), rtol=1e-6, atol=1e-6)


def test_rank_padding_that_is_not_zero_is_kept():
    src = int4_source(256, 256, 32, seed=1)
    src["down"][28:] = 0  # a zero down row with a non-zero up column is not padding
    sd = nk_w4a4(src["codes"], src["wscales"], src["smooth"], src["bias"], src["down"], src["up"])
    layer = decode_w4a4(sd, "int4")
    assert layer.spec.rank == 32
    src["up"][:, 28:] = 0  # now both are zero: dropped
    sd = nk_w4a4(src["codes"], src["wscales"], src["smooth"], src["bias"], src["down"], src["up"])
    layer = decode_w4a4(sd, "int4")
    assert layer.spec.rank == 28


def exact_int4_input(m, k, smooth, unsigned, seed):
    """x [m, K] fp32 whose quantized-branch input (x [+ shift]) / smooth quantizes exactly: every
    64-group is q * sigma with integer q (|q| <= 7 reaching 7, or 0..15 reaching 15) and sigma a
    power of two. smooth must hold powers of two."""
    g = torch.Generator().manual_seed(seed)
    top = 15 if unsigned else 7
    q = torch.randint(0 if unsigned else -top, top + 1, (m, k), generator=g).double()
    q.view(m, k // 64, 64)[:, :, 0] = top
    sigma = 2.0 ** torch.randint(-3, 0, (m, k // 64), generator=g).double().repeat_interleave(64, dim=1)
    x = q * sigma * smooth.double() - (UNSIGNED_SHIFT if unsigned else 0.0)
    return x.float(), q * sigma


def test_int4_forward_matches_nunchakus_function():
    n, k = 256, 256
    src = int4_source(n, k, 32, seed=3)
    src["smooth"] = (2.0 ** torch.randint(-1, 2, (k,), generator=torch.Generator().manual_seed(4))).to(BF16)
    sd = nk_w4a4(src["codes"], src["wscales"], src["smooth"], src["bias"], src["down"], src["up"])
    module = decode_w4a4(sd, "int4").to_module()
    x, xs = exact_int4_input(8, k, src["smooth"], unsigned=False, seed=5)
    residual = src["codes"].double() * src["wscales"].double().T.repeat_interleave(64, dim=1)
    want = xs @ residual.T + x.double() @ src["down"].double().T @ src["up"].double().T + src["bias"].double()
    torch.testing.assert_close(module(x).double(), want, rtol=1e-5, atol=1e-5)


def test_int4_mlp_down_projection_with_shifted_input():
    """deepcompressor shifts the input of fc2 by 0.171875 and converts (convert.py): lora_down /= smooth,
    bias += lora_up @ lora_down @ shift, on top of the shifted module's bias b - W @ shift. Nunchaku's
    kernels feed lora_down the UNshifted GELU output (gemm_w4a4_launch_impl.cuh: EpilogueLoraDown
    before EpilogueQuantize adds the shift), exactly as our act_unsigned layer does, so the decoded
    bias is the file's bias and the layer computes the dense W x + b."""
    n, k, rank = 256, 512, 32
    g = torch.Generator().manual_seed(6)
    src = int4_source(n, k, rank, seed=7)
    src["smooth"] = (2.0 ** torch.randint(-1, 2, (k,), generator=g)).to(BF16)
    branch_a = (torch.randn(rank, k, generator=g) * 0.05).double()  # acts on the smoothed input
    residual = src["codes"].double() * src["wscales"].double().T.repeat_interleave(64, dim=1)
    smooth = src["smooth"].double()
    dense_w = residual / smooth + src["up"].double() @ (branch_a / smooth)
    dense_b = torch.randn(n, generator=g).double()
    shifted_module_bias = dense_b - dense_w @ torch.full((k,), UNSIGNED_SHIFT, dtype=torch.float64)
    lora_down = (branch_a / smooth).to(BF16)
    file_bias = (shifted_module_bias + src["up"].double() @ lora_down.double()
                 @ torch.full((k,), UNSIGNED_SHIFT, dtype=torch.float64)).to(BF16)
    sd = nk_w4a4(src["codes"], src["wscales"], src["smooth"], file_bias, lora_down, src["up"])
    layer = decode_w4a4(sd, "int4", act_unsigned=True, name="transformer_blocks.0.mlp_fc2")
    assert torch.equal(layer.tensors["bias"], file_bias)
    module = layer.to_module()
    assert module.act_unsigned
    x, xs = exact_int4_input(8, k, src["smooth"], unsigned=True, seed=8)
    nunchaku = (xs @ residual.T + x.double() @ lora_down.double().T @ src["up"].double().T
                + file_bias.double())
    torch.testing.assert_close(module(x).double(), nunchaku, rtol=1e-5, atol=1e-5)
    # ... and that is the source's dense function, up to the bf16 rounding of lora_down and bias
    torch.testing.assert_close(nunchaku, x.double() @ dense_w.T + dense_b, rtol=0, atol=0.05)


def fp4_source(n, k, rank, seed):
    g = torch.Generator().manual_seed(seed)
    src = int4_source(n, k, rank, seed)
    src["codes"] = torch.randint(0, 16, (n, k), generator=g)
    src["wscales"] = (2.0 ** torch.randint(-4, 5, (k // 16, n), generator=g).float()).to(torch.float8_e4m3fn)
    return src


def exact_fp4_input(m, k, smooth, seed):
    """x whose x / smooth is, per 16-group, E2M1 values times a power of two, with a 6 in every group."""
    g = torch.Generator().manual_seed(seed)
    v = E2M1[torch.randint(0, 16, (m, k), generator=g)]
    v.view(m, k // 16, 16)[:, :, 0] = 6
    sigma = 2.0 ** torch.randint(-3, 1, (m, k // 16), generator=g).double().repeat_interleave(16, dim=1)
    return (v * sigma * smooth.double()).float(), v * sigma


def test_nvfp4_layer_decodes_and_computes_nunchakus_function():
    n, k, rank = 256, 256, 32
    src = fp4_source(n, k, rank, seed=9)
    src["smooth"] = (2.0 ** torch.randint(-1, 2, (k,), generator=torch.Generator().manual_seed(10))).to(BF16)
    alpha = 0.0078125 * 1.5
    sd = nk_w4a4(src["codes"], src["wscales"], src["smooth"], src["bias"], src["down"], src["up"], wtscale=alpha)
    layer = decode_w4a4(sd, "nvfp4")
    t = layer.tensors
    assert torch.equal(unpack_4bit(t["qweight"], signed=False).long(), src["codes"])
    assert torch.equal(t["wscales"].view(torch.uint8), src["wscales"].view(torch.uint8))
    assert t["wtscale"].dtype == torch.float32 and t["wtscale"].shape == () and t["wtscale"].item() == alpha
    assert torch.equal(t["wcscales"], torch.ones(n))  # absent from the file: 1
    module = layer.to_module()
    torch.testing.assert_close(module.dequantize().double(), dense_w4a4(src, alpha), rtol=1e-6, atol=1e-6)
    x, xs = exact_fp4_input(8, k, src["smooth"], seed=11)
    residual = E2M1[src["codes"]] * src["wscales"].double().T.repeat_interleave(16, dim=1) * alpha
    want = xs @ residual.T + x.double() @ src["down"].double().T @ src["up"].double().T + src["bias"].double()
    torch.testing.assert_close(module(x).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [384, 200])
def test_nvfp4_per_channel_wcscales_decode_exactly(n):
    """Any per-channel wcscales (deepcompressor writes one value per fused q/k/v projection; the
    importer's un-fusing makes them arbitrary) becomes our fp32 wcscales value for value; N = 200
    also cuts the padding to 256."""
    k = 256
    src = fp4_source(n, k, 16, seed=12)
    g = torch.Generator().manual_seed(13)
    src["smooth"] = (2.0 ** torch.randint(-1, 2, (k,), generator=g)).to(BF16)
    wcscales = (torch.rand(n, generator=g) * 4 + 0.01).to(BF16)
    alpha = 0.0078125 * 1.5
    sd = nk_w4a4(src["codes"], src["wscales"], src["smooth"], src["bias"], src["down"], src["up"],
                 wtscale=alpha, wcscales=wcscales)
    layer = decode_w4a4(sd, "nvfp4", out_features=n)
    assert layer.tensors["wcscales"].dtype == torch.float32 and torch.equal(layer.tensors["wcscales"], wcscales.float())
    assert layer.tensors["wtscale"].item() == alpha
    module = layer.to_module()
    lowrank = src["up"].double() @ src["down"].double()
    want = (dense_w4a4(src) - lowrank) * alpha * wcscales.double()[:, None] + lowrank
    torch.testing.assert_close(module.dequantize().double(), want, rtol=1e-6, atol=1e-6)
    x, xs = exact_fp4_input(8, k, src["smooth"], seed=14)
    residual = E2M1[src["codes"]] * src["wscales"].double().T.repeat_interleave(16, dim=1)
    nunchaku = (alpha * (xs @ residual.T) * wcscales.double() + x.double() @ lowrank.T + src["bias"].double())
    torch.testing.assert_close(module(x).double(), nunchaku, rtol=1e-5, atol=1e-5)


def test_int4_refuses_scales_it_cannot_express():
    src = int4_source(256, 256, 16, seed=13)
    sd = nk_w4a4(src["codes"], src["wscales"], src["smooth"], src["bias"], src["down"], src["up"],
                 wcscales=torch.linspace(0.5, 1, 256).to(BF16))
    with pytest.raises(NunchakuFormatError, match="wcscales"):
        decode_w4a4(sd, "int4")
    sd = nk_w4a4(src["codes"], src["wscales"], src["smooth"], src["bias"], src["down"], src["up"], wtscale=2.0)
    with pytest.raises(NunchakuFormatError, match="wtscale"):
        decode_w4a4(sd, "int4")
    ones = nk_w4a4(src["codes"], src["wscales"], src["smooth"], src["bias"], src["down"], src["up"],
                   wtscale=1.0, wcscales=torch.ones(256, dtype=BF16))
    assert set(decode_w4a4(ones, "int4").tensors) == {"qweight", "wscales", "smooth", "lora_down", "lora_up", "bias"}


def test_fused_smooth_is_reported_not_applied():
    """deepcompressor smooth_fused (out_proj): smooth = 1 at run time, smooth_orig = the real factors."""
    src = int4_source(256, 256, 16, seed=14)
    real = src["smooth"].clone()
    src["smooth"] = torch.ones(256, dtype=BF16)
    sd = nk_w4a4(src["codes"], src["wscales"], src["smooth"], src["bias"], src["down"], src["up"], smooth_orig=real)
    layer = decode_w4a4(sd, "int4")
    assert torch.equal(layer.tensors["smooth"], src["smooth"])
    assert torch.equal(layer.smooth_orig, real)
    torch.testing.assert_close(layer.to_module().dequantize().double(), dense_w4a4(src), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("splits,n,k", [(6, 384, 256), (3, 192, 512), (1, 128, 192)])
def test_w4a16_adanorm_layer_decodes_to_comfy_chunks(splits, n, k):
    g = torch.Generator().manual_seed(splits)
    codes = torch.randint(0, 16, (n, k), generator=g)
    scales = (torch.rand(n, k // 64, generator=g) * 0.01 + 0.001).to(BF16)
    bias = (torch.rand(n, generator=g) - 0.5).to(BF16)
    sd = nk_w4a16(codes, scales, bias, splits)
    layer = decode_w4a16(sd, adanorm_splits=splits, name="t")
    t = layer.tensors
    assert torch.equal(unpack_4bit(t["qweight"], signed=False).long(), codes)
    assert torch.equal(t["wscales"], scales.T)
    zeros = (7 * scales.float()).to(BF16).neg()
    assert torch.equal(t["wzeros"], zeros.T)
    scale_chunks = torch.zeros(splits, n // splits, dtype=torch.bool)
    if splits > 1:
        scale_chunks[[1, splits - 2]] = True
    scale_chunks = scale_chunks.reshape(n)
    assert torch.equal(t["bias"][~scale_chunks], bias[~scale_chunks])
    if splits > 1:  # bf16(b + 1) - 1: within half an ulp of 1
        assert (t["bias"][scale_chunks].float() - bias[scale_chunks].float()).abs().max() <= 2.0 ** -8
    module = layer.to_module()
    assert isinstance(module, W4A16Linear)
    dense = codes.double() * scales.double().repeat_interleave(64, dim=1) + zeros.double().repeat_interleave(64, 1)
    assert torch.equal(module.dequantize().double(), dense)
    x = torch.randn(3, k)
    torch.testing.assert_close(module(x).double(), x.double() @ dense.T + t["bias"].double(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Errors


def test_wrong_shape_and_missing_tensors_fail_clearly():
    src = int4_source(256, 256, 16, seed=15)
    sd = nk_w4a4(src["codes"], src["wscales"], src["smooth"], src["bias"], src["down"], src["up"])
    bad = dict(sd, wscales=sd["wscales"][:2])
    with pytest.raises(NunchakuFormatError, match=r"'x\.qkv_proj'.*'wscales' is bfloat16 \[2, 256\], expected "
                                                  r"bfloat16 \[4, 256\]"):
        decode_w4a4(bad, "int4", name="x.qkv_proj")
    missing = {k: v for k, v in sd.items() if k != "smooth"}
    with pytest.raises(NunchakuFormatError, match="'smooth' is missing"):
        decode_w4a4(missing, "int4")
    no_up = {k: v for k, v in sd.items() if k != "lora_up"}
    with pytest.raises(NunchakuFormatError, match="'lora_up' is missing"):
        decode_w4a4(no_up, "int4")
    with pytest.raises(NunchakuFormatError, match="unexpected tensor"):
        decode_w4a4(dict(sd, wzeros=sd["bias"]), "int4")
    with pytest.raises(NunchakuFormatError, match="out_features 100 does not fit"):
        decode_w4a4(sd, "int4", out_features=100)
    w16 = nk_w4a16(torch.randint(0, 16, (192, 256)), torch.rand(192, 4).to(BF16), torch.zeros(192, dtype=BF16), 3)
    with pytest.raises(NunchakuFormatError, match="'wzeros' is missing"):
        decode_w4a16({k: v for k, v in w16.items() if k != "wzeros"}, adanorm_splits=3)
    with pytest.raises(NunchakuFormatError, match="cannot be split into 5"):
        decode_w4a16(w16, adanorm_splits=5)


COMFY_CONFIG = {"model_class": "Flux", "model_config": {"hidden_size": 3072, "mlp_ratio": 4.0, "depth": 19}}


class Spec:
    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype


def test_header_detection_and_precision():
    specs = {"transformer_blocks.0.qkv_proj.lora_down": Spec((3072, 32), BF16),
             "transformer_blocks.0.qkv_proj.wscales": Spec((48, 9216), BF16)}
    meta = {"quantization_config": json.dumps(INT4_CONFIG), "model_class": "NunchakuFluxTransformer2dModel",
            "comfy_config": json.dumps(COMFY_CONFIG), "config": json.dumps({"num_layers": 19})}
    assert is_nunchaku_metadata(meta) and not is_nunchaku_metadata({"format": "comfyui-svdquant"})
    header = read_nunchaku_header(meta, specs)
    assert (header.precision, header.rank, header.comfy_model_class) == ("int4", 32, "Flux")
    assert header.comfy_model_config["hidden_size"] == 3072 and header.diffusers_config == {"num_layers": 19}
    fp4 = read_nunchaku_header(dict(meta, quantization_config=json.dumps(dict(FP4_CONFIG, rank=128))), specs)
    assert (fp4.precision, fp4.rank) == ("nvfp4", 128)
    unknown = dict(INT4_CONFIG, weight={"dtype": "int8", "group_size": 128})
    with pytest.raises(NunchakuFormatError, match="unknown quantization_config"):
        read_nunchaku_header(dict(meta, quantization_config=json.dumps(unknown)), specs)
    with pytest.raises(NunchakuFormatError, match="not a FLUX model"):
        read_nunchaku_header(dict(meta, model_class="NunchakuQwenImageTransformer2DModel"), specs)


def test_folder_form(tmp_path):
    with pytest.raises(NunchakuFormatError, match="transformer_blocks.safetensors"):
        folder_metadata(tmp_path)
    for name in ("transformer_blocks.safetensors", "unquantized_layers.safetensors"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "comfy_config.json").write_text(json.dumps(COMFY_CONFIG))
    meta = folder_metadata(tmp_path)
    specs = {"transformer_blocks.0.qkv_proj.wscales": Spec((192, 9216), torch.float8_e4m3fn)}
    header = read_nunchaku_header(meta, specs)
    assert header.precision == "nvfp4" and header.comfy_model_config == COMFY_CONFIG["model_config"]
    assert read_nunchaku_header(meta, {"a.wscales": Spec((48, 9216), BF16)}).precision == "int4"


# ---------------------------------------------------------------------------------------------
# Names (ComfyUI comfy/utils.py flux_to_diffusers; shapes from shared/DESIGN.md §6)

H, M = 3072, 12288


def test_double_block_names():
    expect = {"qkv_proj": "img_attn.qkv", "qkv_proj_context": "txt_attn.qkv", "out_proj": "img_attn.proj",
              "out_proj_context": "txt_attn.proj", "mlp_fc1": "img_mlp.0", "mlp_fc2": "img_mlp.2",
              "mlp_context_fc1": "txt_mlp.0", "mlp_context_fc2": "txt_mlp.2", "norm1.linear": "img_mod.lin",
              "norm1_context.linear": "txt_mod.lin"}
    for theirs, ours in expect.items():
        target = comfy_target(f"transformer_blocks.7.{theirs}", H, M)
        assert target.module == f"double_blocks.7.{ours}" and target.slice is None
    assert comfy_target("transformer_blocks.0.mlp_fc2", H, M).act_unsigned("int4")
    assert not comfy_target("transformer_blocks.0.mlp_fc2", H, M).act_unsigned("nvfp4")
    assert not comfy_target("transformer_blocks.0.mlp_fc1", H, M).act_unsigned("int4")
    assert comfy_target("transformer_blocks.0.norm1.linear", H, M).adanorm_splits == 6
    with pytest.raises(NunchakuFormatError, match="not a quantized FLUX layer"):
        comfy_target("transformer_blocks.0.ff.net.0.proj", H, M)


def test_single_block_slices_tile_linear1_and_linear2():
    parts = {name: comfy_target(f"single_transformer_blocks.3.{name}", H, M).slice
             for name in ("qkv_proj", "mlp_fc1", "out_proj", "mlp_fc2")}
    assert parts["qkv_proj"] == ("single_blocks.3.linear1", "rows", 0, 3 * H)
    assert parts["mlp_fc1"] == ("single_blocks.3.linear1", "rows", 3 * H, 21504)  # linear1 3072 -> 21504
    assert parts["out_proj"] == ("single_blocks.3.linear2", "cols", 0, H)
    assert parts["mlp_fc2"] == ("single_blocks.3.linear2", "cols", H, 15360)  # linear2 15360 -> 3072
    assert comfy_target("single_transformer_blocks.3.mlp_fc2", H, M).act_unsigned("int4")
    norm = comfy_target("single_transformer_blocks.3.norm.linear", H, M)
    assert norm.module == "single_blocks.3.modulation.lin" and norm.adanorm_splits == 3


def test_dense_names_and_norm_out_swap():
    assert comfy_dense_key("transformer_blocks.2.norm_added_k.weight") == ("double_blocks.2.txt_attn.norm.key_norm.scale",
                                                                           False)
    assert comfy_dense_key("single_transformer_blocks.5.norm_q.weight") == ("single_blocks.5.norm.query_norm.scale",
                                                                            False)
    assert comfy_dense_key("time_text_embed.guidance_embedder.linear_2.bias") == ("guidance_in.out_layer.bias", False)
    assert comfy_dense_key("norm_out.linear.weight") == ("final_layer.adaLN_modulation.1.weight", True)
    assert torch.equal(swap_halves(torch.arange(6)), torch.tensor([3, 4, 5, 0, 1, 2]))
    assert split_layer_key("single_transformer_blocks.1.mlp_fc2.lora_up") == ("single_transformer_blocks.1.mlp_fc2",
                                                                               "lora_up")
    assert split_layer_key("transformer_blocks.1.norm_q.weight") == (None, None)
    with pytest.raises(NunchakuFormatError, match="not a dense FLUX tensor"):
        comfy_dense_key("transformer_blocks.0.attn.to_q.weight")

