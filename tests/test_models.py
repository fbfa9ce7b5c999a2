"""The FLUX.1 layer map and the test-checkpoint helper (no ComfyUI needed)."""
import pytest
import torch

from nunchaku_ext.format import load_checkpoint, save_checkpoint
from nunchaku_ext.layers import LayerSpec
from nunchaku_ext.lora import make_lora_layer
from nunchaku_ext.models import (
    FLUX1_FAMILY,
    ModelConfigError,
    check_flux1_checkpoint,
    flux1_layer_specs,
    quantize_flux1_state_dict,
)

# comfy.ldm.flux.model.Flux arguments of FLUX.1-dev, as ComfyUI's model detection makes them.
FLUX1_DEV = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                 mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
                 theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
TINY = dict(FLUX1_DEV, context_in_dim=64, vec_in_dim=32, hidden_size=128, num_heads=2, depth=1,
            depth_single_blocks=2, axes_dim=[8, 28, 28])


def dense_flux1_state_dict(cfg, seed=0):
    """Random dense weights under ComfyUI's FLUX.1 state-dict names (the integration tests check the
    names against ComfyUI's own model)."""
    g = torch.Generator().manual_seed(seed)
    h, m, hd = cfg["hidden_size"], int(cfg["hidden_size"] * cfg["mlp_ratio"]), cfg["hidden_size"] // cfg["num_heads"]
    p2 = cfg["patch_size"] ** 2
    shapes = {"img_in": (h, cfg["in_channels"] * p2), "time_in.in_layer": (h, 256), "time_in.out_layer": (h, h),
              "vector_in.in_layer": (h, cfg["vec_in_dim"]), "vector_in.out_layer": (h, h),
              "txt_in": (h, cfg["context_in_dim"]), "final_layer.linear": (p2 * cfg["out_channels"], h),
              "final_layer.adaLN_modulation.1": (2 * h, h)}
    if cfg["guidance_embed"]:
        shapes.update({"guidance_in.in_layer": (h, 256), "guidance_in.out_layer": (h, h)})
    for name, spec in flux1_layer_specs(cfg, 0).items():
        shapes[name] = (spec.out_features, spec.in_features)
    sd = {}
    for name, (n, k) in shapes.items():
        sd[f"{name}.weight"] = torch.randn(n, k, generator=g) / k ** 0.5
        sd[f"{name}.bias"] = torch.randn(n, generator=g) * 0.01
    norms = [f"double_blocks.{i}.{s}_attn.norm" for i in range(cfg["depth"]) for s in ("img", "txt")]
    norms += [f"single_blocks.{i}.norm" for i in range(cfg["depth_single_blocks"])]
    for norm in norms:
        for q in ("query_norm", "key_norm"):
            sd[f"{norm}.{q}.scale"] = torch.ones(hd)
    return sd


def test_flux1_dev_layer_map_has_the_published_shapes():
    specs = flux1_layer_specs(FLUX1_DEV, 32)
    assert len(specs) == 19 * 10 + 38 * 3
    shape = lambda n: (specs[n].kind, specs[n].in_features, specs[n].out_features)  # noqa: E731
    assert shape("double_blocks.0.img_attn.qkv") == ("w4a4", 3072, 9216)
    assert shape("double_blocks.18.txt_attn.proj") == ("w4a4", 3072, 3072)
    assert shape("double_blocks.3.img_mlp.0") == ("w4a4", 3072, 12288)
    assert shape("double_blocks.3.txt_mlp.2") == ("w4a4", 12288, 3072)
    assert shape("double_blocks.5.img_mod.lin") == ("w4a16", 3072, 18432)
    assert shape("single_blocks.37.linear1") == ("w4a4", 3072, 21504)
    assert shape("single_blocks.0.linear2") == ("w4a4", 15360, 3072)
    assert shape("single_blocks.0.modulation.lin") == ("w4a16", 3072, 9216)
    unsigned = {n for n, s in specs.items() if s.act_unsigned}
    assert unsigned == {f"double_blocks.{i}.{s}_mlp.2" for i in range(19) for s in ("img", "txt")}
    assert all(s.rank == 32 for s in specs.values() if s.kind == "w4a4")


@pytest.mark.parametrize("change,match", [
    ({"global_modulation": True}, "not a FLUX.1"),
    ({"mlp_silu_act": True}, "not a FLUX.1"),
    ({"axes_dim": [16, 56, 48]}, "do not fit"),
])
def test_other_architectures_are_refused(change, match):
    with pytest.raises(ModelConfigError, match=match):
        flux1_layer_specs(dict(FLUX1_DEV, **change), 32)
    cfg = dict(FLUX1_DEV)
    del cfg["depth"]
    with pytest.raises(ModelConfigError, match="lacks depth"):
        flux1_layer_specs(cfg, 32)


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_quantized_state_dict_round_trips_and_layers_match_dense(tmp_path, precision):
    dense = dense_flux1_state_dict(TINY)
    info, tensors = quantize_flux1_state_dict(dense, TINY, rank=8, precision=precision)
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, info, tensors)
    info2, loaded = load_checkpoint(path)
    check_flux1_checkpoint(info2)
    assert info2.model_family == FLUX1_FAMILY and info2.model_config == TINY
    assert set(info2.layers) == set(flux1_layer_specs(TINY, 8))
    # Dense tensors keep their names; quantized layers own only their own tensors.
    assert torch.equal(loaded["img_in.weight"], dense["img_in.weight"].to(torch.bfloat16))
    assert "double_blocks.0.img_attn.qkv.weight" not in loaded
    for name, spec in info2.layers.items():
        layer = make_lora_layer(spec, precision)
        layer.load_state_dict({k[len(name) + 1:]: v for k, v in loaded.items() if k.rpartition(".")[0] == name})
        w = dense[f"{name}.weight"]
        err = (layer.dequantize() - w).norm() / w.norm()
        assert err < (0.15 if spec.kind == "w4a4" else 0.1), (name, err)


def test_checkpoint_check_names_wrong_layers():
    dense = dense_flux1_state_dict(TINY)
    info, _ = quantize_flux1_state_dict(dense, TINY, rank=4)
    spec = info.layers.pop("single_blocks.0.linear2")
    info.layers["single_blocks.0.linear3"] = spec
    with pytest.raises(ModelConfigError, match="linear3"):
        check_flux1_checkpoint(info)
    info.layers.pop("single_blocks.0.linear3")
    info.layers["single_blocks.0.linear2"] = type(spec)("w4a4", spec.in_features, 2 * spec.out_features, True, 4)
    with pytest.raises(ModelConfigError, match="this FLUX.1 config makes it"):
        check_flux1_checkpoint(info)
    info.model_family = "sd3"
    with pytest.raises(ModelConfigError, match="not supported"):
        check_flux1_checkpoint(info)


def test_layer_widths_must_fit_the_group_size():
    with pytest.raises(ModelConfigError, match="group size"):
        quantize_flux1_state_dict({}, dict(TINY, hidden_size=96, num_heads=1, axes_dim=[16, 40, 40]), rank=4)


def split_single_block_info(rank=4):
    """TINY's checkpoint info with single block 0's linear1 split by rows and linear2 by columns, as
    Nunchaku's files have them (attention part first)."""
    info, _ = quantize_flux1_state_dict(dense_flux1_state_dict(TINY), TINY, rank=rank)
    h, m = TINY["hidden_size"], int(TINY["hidden_size"] * TINY["mlp_ratio"])
    p = "single_blocks.0"
    del info.layers[f"{p}.linear1"], info.layers[f"{p}.linear2"]
    w4a4 = lambda k, n, part, unsigned=False: LayerSpec("w4a4", k, n, True, rank, unsigned, part)  # noqa: E731
    info.layers.update({f"{p}.linear1.qkv_proj": w4a4(h, 3 * h, ("rows", 0, 3 * h)),
                        f"{p}.linear1.mlp_fc1": w4a4(h, m, ("rows", 3 * h, 3 * h + m)),
                        f"{p}.linear2.out_proj": w4a4(h, h, ("cols", 0, h)),
                        f"{p}.linear2.mlp_fc2": w4a4(m, h, ("cols", h, h + m), unsigned=True)})
    return info


def test_checkpoint_check_accepts_split_linears_whose_parts_make_the_linear():
    check_flux1_checkpoint(split_single_block_info())


def test_checkpoint_check_names_split_linears_that_do_not_make_the_linear():
    info = split_single_block_info()
    mlp = info.layers.pop("single_blocks.0.linear1.mlp_fc1")
    with pytest.raises(ModelConfigError, match=r"split linear 'single_blocks.0.linear1'.*->384; .* 128->896"):
        check_flux1_checkpoint(info)
    info = split_single_block_info()
    info.layers["single_blocks.0.linear1.mlp_fc1"] = LayerSpec("w4a16", mlp.in_features, mlp.out_features, True,
                                                              part=mlp.part)
    with pytest.raises(ModelConfigError, match=r"parts \['mlp_fc1'\] are not w4a4"):
        check_flux1_checkpoint(info)
    info = split_single_block_info()
    del info.layers["single_blocks.0.modulation.lin"]
    info.layers["single_blocks.0.modulation.lin.a"] = LayerSpec("w4a4", 128, 384, True, 4, part=("rows", 0, 384))
    with pytest.raises(ModelConfigError, match="makes it w4a16"):
        check_flux1_checkpoint(info)
