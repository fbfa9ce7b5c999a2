"""Whole Nunchaku FLUX.1 checkpoints -> our format, against the independent writer in
nunchaku_writer.py: a tiny random FLUX.1 (hidden 256, 2 heads of 128, MLP 1024, 2 + 2 blocks)
written in Nunchaku's layout, with deepcompressor's attention smoothing fused into v, in both
precisions and both forms. The import must validate, give the source config, and compute the
ORIGINAL dense model, layer by layer, to the precision docs/nunchaku-format.md states."""
import json

import pytest
import torch
from nunchaku_writer import E2M1, nk_pack_scale, write_flux
from safetensors.torch import save_file

from nunchaku_ext.format import CheckpointError, load_checkpoint, save_checkpoint
from nunchaku_ext.layers import SplitLinear, W4A16Linear, make_module
from nunchaku_ext.models import FLUX1_FAMILY, FLUX1_REQUIRED, flux1_layer_specs
from nunchaku_ext.numerics import UNSIGNED_SHIFT
from nunchaku_ext.nunchaku_import import import_nunchaku, is_nunchaku_checkpoint
from nunchaku_ext.nunchaku_layout import NunchakuFormatError

TINY = dict(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=256, mlp_ratio=4.0,
            num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
            qkv_bias=True, guidance_embed=True)


@pytest.fixture(scope="module", params=["int4", "nvfp4"])
def flux(request):
    return write_flux(TINY, request.param, seed={"int4": 1, "nvfp4": 2}[request.param])


@pytest.fixture(scope="module")
def imported(flux, tmp_path_factory):
    path = flux.save_file(tmp_path_factory.mktemp("nunchaku") / "svdq-tiny.safetensors")
    return path, *import_nunchaku(path)


def module_tensors(tensors, module):
    prefix = module + "."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def load_module(info, tensors, module):
    m = make_module(info.modules()[module], info.precision, info.dtype)
    m.load_state_dict(module_tensors(tensors, module))
    return m


def parts_of(module):
    """(layer, start, stop) of a SplitLinear's parts, or the one whole layer."""
    if isinstance(module, SplitLinear):
        return [(module.get_submodule(name), *span) for name, span in module.spans.items()]
    return [(module, 0, None)]


def weight_and_bias(module):
    """The dense function (W [N, K], b [N]) a quantized module computes, from its buffers: for an
    act_unsigned layer the bias includes what the quantized branch adds for the shift."""
    weights, biases = [], []
    for layer, _, _ in parts_of(module):
        weights.append(layer.dequantize().double())
        bias = layer.bias.double()
        if getattr(layer, "act_unsigned", False):
            bias = bias + layer.dequantized_residual().double() / layer.smooth.double() @ torch.full(
                (layer.in_features,), UNSIGNED_SHIFT, dtype=torch.float64)
        biases.append(bias)
    if isinstance(module, SplitLinear) and module.mode == "cols":
        return torch.cat(weights, 1), sum(biases)
    return torch.cat(weights), torch.cat(biases)


def assert_within(actual, expected, tol, what):
    """|actual - expected| <= tol elementwise, plus fp32 arithmetic (2^-20 of the largest value)."""
    excess = (actual - expected).abs() - tol - 2.0 ** -20 * expected.abs().max()
    assert excess.max() <= 0, f"{what}: off by up to {excess.max().item():.3g} beyond the tolerance"


def exact_input(rows, layer, seed):
    """x [rows, K] fp32 whose quantized-branch input (x [+ shift]) / smooth quantizes without error:
    per group, codes times a power of two, the group's largest code at its maximum."""
    g = torch.Generator().manual_seed(seed)
    k, smooth = layer.in_features, layer.smooth.double()
    if layer.precision == "nvfp4":
        group, v = 16, E2M1[torch.randint(0, 16, (rows, k), generator=g)]
        v.view(rows, k // 16, 16)[:, :, 0] = 6
    else:
        group, top = 64, 15 if layer.act_unsigned else 7
        v = torch.randint(0 if layer.act_unsigned else -top, top + 1, (rows, k), generator=g).double()
        v.view(rows, k // 64, 64)[:, :, 0] = top
    sigma = 2.0 ** torch.randint(-3, 0, (rows, k // group), generator=g).double().repeat_interleave(group, dim=1)
    x = (v * sigma * smooth - (UNSIGNED_SHIFT if layer.act_unsigned else 0.0)).float()
    assert torch.equal((x.double() + (UNSIGNED_SHIFT if layer.act_unsigned else 0.0)) / smooth, v * sigma)
    return x


# ---------------------------------------------------------------------------------------------


def test_checkpoint_validates_with_the_source_config(flux, imported, tmp_path):
    path, info, tensors = imported
    assert is_nunchaku_checkpoint(path)
    assert (info.precision, info.model_family, info.rank, info.dtype) == (flux.precision, FLUX1_FAMILY, 32,
                                                                           torch.bfloat16)
    assert set(info.model_config) == set(FLUX1_REQUIRED) and info.model_config == TINY
    # Every linear of the layer map, with its shape; the single blocks' two linears in two parts each.
    modules = info.modules()
    want = flux1_layer_specs(TINY, 32, info.precision)
    assert set(modules) == set(want)
    for name, parts in modules.items():
        m = make_module(parts, info.precision, info.dtype)
        assert (m.in_features, m.out_features) == (want[name].in_features, want[name].out_features), name
    assert sorted(modules["single_blocks.1.linear1"]) == ["mlp_fc1", "qkv_proj"]
    assert modules["single_blocks.1.linear2"]["mlp_fc2"].part == ("cols", 256, 1280)
    assert modules["double_blocks.0.img_mlp.2"][""].act_unsigned == (info.precision == "int4")
    # Our own file from it: a free convert, read back unchanged and not taken for Nunchaku's.
    ours = tmp_path / "ours.safetensors"
    save_checkpoint(ours, info, tensors)
    assert not is_nunchaku_checkpoint(ours)
    info2, tensors2 = load_checkpoint(ours)
    assert info2 == info and tensors2.keys() == tensors.keys()
    assert all(same_bits(tensors2[k], tensors[k]) for k in tensors)


def test_folder_form_imports_the_same(flux, imported, tmp_path):
    _, info, tensors = imported
    folder = flux.save_folder(tmp_path / "svdq-tiny")
    assert is_nunchaku_checkpoint(folder)
    info2, tensors2 = import_nunchaku(folder)
    assert info2 == info and tensors2.keys() == tensors.keys()
    assert all(same_bits(tensors2[k], tensors[k]) for k in tensors)


def test_dense_tensors_are_bit_equal(flux, imported):
    _, info, tensors = imported
    assert set(tensors) - set(info.expected_tensors()) == set(flux.dense)
    for name, t in flux.dense.items():
        assert same_bits(tensors[name], t), name


def test_every_quantized_module_is_the_original_linear(flux, imported):
    """dequantize() and bias against the ORIGINAL dense weights: exact but for one bf16 rounding
    of each factor that un-fusing rescales (int4: v's group scales; both: v's lora_up rows and
    bias, the out projections' lora_down) and the file's own rounded biases."""
    _, info, tensors = imported
    for name in info.modules():
        source = flux.linears[name]
        weight, bias = weight_and_bias(load_module(info, tensors, name))
        assert_within(weight, source.weight, source.weight_tol, f"{name} weight")
        assert_within(bias, source.bias, source.bias_tol, f"{name} bias")
    # An importer that kept Nunchaku's fused v rows (the original over s) would fail the check above.
    v, qkv = slice(512, 768), flux.linears["double_blocks.0.img_attn.qkv"]
    fused = qkv.weight[v] / flux.fused_smoothing["double_blocks.0"].double()[:, None]
    assert ((fused - qkv.weight[v]).abs() > qkv.weight_tol[v]).float().mean() > 0.9


def test_attention_and_every_linear_compute_the_original_function(flux, imported):
    """The forward pass, on inputs that the activation quantizers represent exactly: each module
    computes x W_origᵀ + b_orig. For the out projections x is the attention output o itself (not
    Nunchaku's o / s), for qkv the v rows come out as the original model's."""
    _, info, tensors = imported
    for i, name in enumerate(sorted(info.modules())):
        module = load_module(info, tensors, name)
        source = flux.linears[name]
        parts = parts_of(module)
        if isinstance(parts[0][0], W4A16Linear):
            x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(i))
        elif isinstance(module, SplitLinear) and module.mode == "cols":
            x = torch.cat([exact_input(4, layer, seed=i * 10 + j) for j, (layer, _, _) in enumerate(parts)], dim=1)
        else:
            x = exact_input(4, parts[0][0], seed=i)
            assert all(torch.equal(layer.smooth, parts[0][0].smooth) for layer, _, _ in parts)  # shared input
        y = module(x).double()
        x64 = x.double()
        want = x64 @ source.weight.T + source.bias
        # The stated roundings, plus fp32 accumulation over up to 1280 inputs (the reference
        # backend sums group by group in fp32).
        magnitude = x64.abs() @ source.weight.abs().T + source.bias.abs()
        tol = x64.abs() @ source.weight_tol.T + source.bias_tol + 2.0 ** -14 * magnitude
        assert ((y - want).abs() <= tol).all(), f"{name}: off by {(y - want).abs().max().item():.3g}"


# ---------------------------------------------------------------------------------------------
# Errors: one exception class (a CheckpointError too), the path in the message.


def write_changed(flux, tmp_path, tensors=None, **metadata):
    meta = dict(flux.metadata, **metadata)
    path = tmp_path / "changed.safetensors"
    save_file(flux.tensors if tensors is None else tensors, str(path), metadata=meta)
    return path


def expect_error(path, match):
    with pytest.raises(NunchakuFormatError, match=match) as e:
        import_nunchaku(path)
    assert str(path) in str(e.value) and isinstance(e.value, CheckpointError)


def test_tensor_errors(flux, tmp_path):
    changed = dict(flux.tensors)
    changed["transformer_blocks.1.mlp_fc1.wscales"] = changed["transformer_blocks.1.mlp_fc1.wscales"][:2]
    expect_error(write_changed(flux, tmp_path, changed), r"'transformer_blocks\.1\.mlp_fc1': tensor 'wscales' is")
    dropped = ("single_transformer_blocks.1.mlp_fc2.", "transformer_blocks.0.norm_k.weight")
    changed = {k: v for k, v in flux.tensors.items() if not k.startswith(dropped)}
    expect_error(write_changed(flux, tmp_path, changed),
                 r"missing: single_transformer_blocks\.1\.mlp_fc2, transformer_blocks\.0\.norm_k\.weight")
    changed = {k: v for k, v in flux.tensors.items() if k != "transformer_blocks.0.out_proj.smooth"}
    expect_error(write_changed(flux, tmp_path, changed),
                 r"'transformer_blocks\.0\.out_proj': tensor 'smooth' is missing")
    changed = dict(flux.tensors, **{"transformer_blocks.0.attn.to_q.weight": torch.zeros(4)})
    expect_error(write_changed(flux, tmp_path, changed), r"unknown tensor.*transformer_blocks\.0\.attn\.to_q\.weight")


def test_header_errors(flux, tmp_path):
    unknown = {"method": "svdquant", "weight": {"dtype": "int8", "group_size": 128}}
    expect_error(write_changed(flux, tmp_path, quantization_config=json.dumps(unknown)), "unknown quantization_config")
    expect_error(write_changed(flux, tmp_path, model_class="NunchakuQwenImageTransformer2DModel"), "not a FLUX model")
    comfy = json.loads(flux.metadata["comfy_config"])
    comfy["model_config"].update(depth=19, mlp_ratio=3.0)
    expect_error(write_changed(flux, tmp_path, comfy_config=json.dumps(comfy)),
                 r"comfy_config does not match its tensors:\n  mlp_ratio: comfy_config says 3\.0, the tensors give "
                 r"4\.0\n  depth: comfy_config says 19")
    ours = tmp_path / "ours.safetensors"
    save_checkpoint(ours, *import_nunchaku(flux.save_file(tmp_path / "theirs.safetensors")))
    expect_error(ours, "not a Nunchaku checkpoint")


def test_smoothing_it_cannot_unfuse_is_refused(flux, tmp_path):
    other = nk_pack_scale(torch.rand(256, 1).to(torch.bfloat16) + 0.5)
    changed = dict(flux.tensors, **{"transformer_blocks.1.mlp_fc1.smooth_orig": other})
    expect_error(write_changed(flux, tmp_path, changed),
                 r"'transformer_blocks\.1\.mlp_fc1' has smooth_orig different from smooth")
    changed = dict(flux.tensors, **{"transformer_blocks.1.out_proj_context.smooth_orig": other})
    expect_error(write_changed(flux, tmp_path, changed), "carry different fused smoothing")
