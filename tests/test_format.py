"""Checkpoint format: round trips, a file written from docs/format.md alone, and every bad-input error."""
import dataclasses
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from nunchaku_ext import format as fmt
from nunchaku_ext.format import CheckpointError, CheckpointInfo
from nunchaku_ext.layers import make_layer, make_module
from nunchaku_ext.numerics import pack_4bit
from nunchaku_ext.quantize import quantize_w4a4, quantize_w4a16


def small_checkpoint(precision="int4", dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    layers = {
        "blocks.0.qkv": quantize_w4a4(torch.randn(48, 128, generator=g), torch.randn(48, generator=g), 8,
                                      precision=precision, dtype=dtype),
        "blocks.0.mlp.2": quantize_w4a4(torch.randn(32, 64, generator=g), None, 4, precision=precision,
                                        act_unsigned=precision == "int4", dtype=dtype),
        "blocks.0.mod.lin": quantize_w4a16(torch.randn(24, 64, generator=g), torch.randn(24, generator=g),
                                           dtype=dtype),
    }
    tensors = {f"{name}.{k}": t for name, layer in layers.items() for k, t in layer.state_dict().items()}
    tensors["img_in.weight"] = torch.randn(128, 16, generator=g).to(dtype)
    tensors["final_layer.norm.scale"] = torch.ones(128, dtype=torch.float32)
    info = CheckpointInfo(precision, 8, dtype, "flux.1", {"hidden_size": 128, "depth": 1},
                          {name: layer.spec() for name, layer in layers.items()})
    return info, tensors, layers


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_trip(tmp_path, precision, dtype):
    info, tensors, layers = small_checkpoint(precision, dtype)
    path = tmp_path / "model.safetensors"
    fmt.save_checkpoint(path, info, tensors)
    assert not (tmp_path / "model.safetensors.partial").exists()
    got_info, got = fmt.load_checkpoint(path)
    assert got_info == info and fmt.read_info(path) == info
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    for name, spec in got_info.layers.items():
        layer = make_layer(spec, got_info.precision, got_info.dtype, device="meta").to_empty(device="cpu")
        layer.load_state_dict(fmt.layer_tensors(got, name))
        x = torch.randn(3, spec.in_features, dtype=dtype)
        assert torch.equal(layer(x), layers[name](x))


def test_file_written_from_the_format_document(tmp_path):
    """Writes a file with plain safetensors following docs/format.md, without our writer."""
    N, K, r = 16, 128, 2
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(-7, 8, (N, K), generator=g)
    wscales = torch.rand(K // 64, N, generator=g).bfloat16()
    smooth = (torch.rand(K, generator=g) + 0.5).bfloat16()
    down, up = torch.randn(r, K, generator=g).bfloat16(), torch.randn(N, r, generator=g).bfloat16()
    bias = torch.randn(N, generator=g).bfloat16()
    qweight = torch.tensor([[(int(codes[n, 2 * j]) & 15) | ((int(codes[n, 2 * j + 1]) & 15) << 4)
                             for j in range(K // 2)] for n in range(N)], dtype=torch.uint8)
    meta = {"format": "comfyui-svdquant", "format_version": "1", "precision": "int4", "group_size": "64",
            "rank": str(r), "dtype": "bfloat16", "model_family": "flux.1", "model_config": "{}",
            "layers": json.dumps({"lin": {"kind": "w4a4", "in_features": K, "out_features": N, "bias": True}})}
    path = tmp_path / "hand.safetensors"
    save_file({"lin.qweight": qweight, "lin.wscales": wscales, "lin.smooth": smooth, "lin.lora_down": down,
               "lin.lora_up": up, "lin.bias": bias}, path, metadata=meta)
    info, tensors = fmt.load_checkpoint(path)
    assert info.layers["lin"].rank == r and not info.layers["lin"].act_unsigned
    layer = make_layer(info.layers["lin"], info.precision, info.dtype, device="meta").to_empty(device="cpu")
    layer.load_state_dict(fmt.layer_tensors(tensors, "lin"))
    dense = (codes.float() * wscales.float().T.repeat_interleave(64, 1)) / smooth.float()
    dense += up.float() @ down.float()
    assert torch.allclose(layer.dequantize(), dense)
    assert torch.equal(layer.qweight, pack_4bit(codes))


def saved(tmp_path, info, tensors, name="bad.safetensors"):
    """Write with plain safetensors (our writer would refuse a bad file)."""
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=info.to_metadata())
    return path


def expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as e:
        fmt.load_checkpoint(path)
    message = str(e.value)
    assert str(path) in message
    for f in fragments:
        assert f in message, message
    return message


def test_truncated_data(tmp_path):
    info, tensors, _ = small_checkpoint()
    path = saved(tmp_path, info, tensors)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    expect_error(path, "truncated", "Download or copy it again")


def test_truncated_header_and_garbage(tmp_path):
    info, tensors, _ = small_checkpoint()
    path = saved(tmp_path, info, tensors)
    path.write_bytes(path.read_bytes()[:50])
    expect_error(path, "truncated inside its header")
    path.write_bytes(b"\x01\x02")
    expect_error(path, "not a safetensors file")
    path.write_bytes((5).to_bytes(8, "little") + b"{oops")
    expect_error(path, "header is not JSON")


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    torch.save({"w": torch.zeros(2)}, path)
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load"))
    expect_error(path, "not a safetensors file")


def test_missing_tensor(tmp_path):
    info, tensors, _ = small_checkpoint()
    del tensors["blocks.0.qkv.lora_up"]
    expect_error(saved(tmp_path, info, tensors),
                 "tensor 'blocks.0.qkv.lora_up' is missing (expected bfloat16 [48, 8])")


def test_extra_tensors(tmp_path):
    info, tensors, _ = small_checkpoint()
    tensors["blocks.0.qkv.weight"] = torch.zeros(48, 128)
    tensors["blocks.1.qkv.qweight"] = torch.zeros(4, 4, dtype=torch.uint8)
    message = expect_error(saved(tmp_path, info, tensors),
                           "unexpected tensor 'blocks.0.qkv.weight': a w4a4 layer owns only",
                           "unexpected tensor 'blocks.1.qkv.qweight': 'blocks.1.qkv' is not declared")
    assert "qweight, wscales" in message


def test_wrong_shape_and_dtype(tmp_path):
    info, tensors, _ = small_checkpoint()
    tensors["blocks.0.qkv.qweight"] = tensors["blocks.0.qkv.qweight"][:, :32]
    tensors["blocks.0.mod.lin.wscales"] = tensors["blocks.0.mod.lin.wscales"].float()
    tensors["img_in.weight"] = torch.zeros(3, dtype=torch.int32)
    expect_error(saved(tmp_path, info, tensors),
                 "tensor 'blocks.0.qkv.qweight' is uint8 [48, 32], expected uint8 [48, 64]",
                 "tensor 'blocks.0.mod.lin.wscales' is float32 [1, 24], expected bfloat16 [1, 24]",
                 "tensor 'img_in.weight' of a dense layer is int32 [3], expected a floating-point dtype")


def test_rank_mismatch_between_metadata_and_tensors(tmp_path):
    info, tensors, _ = small_checkpoint()
    info.layers["blocks.0.qkv"] = fmt.LayerSpec("w4a4", 128, 48, True, 16)
    expect_error(saved(tmp_path, info, tensors), "'blocks.0.qkv.lora_down' is bfloat16 [8, 128], expected bfloat16 [16, 128]")


def with_metadata(tmp_path, **changes):
    info, tensors, _ = small_checkpoint()
    meta = info.to_metadata()
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    path = tmp_path / "meta.safetensors"
    save_file(tensors, path, metadata=meta)
    return path


def test_metadata_errors(tmp_path):
    expect_error(with_metadata(tmp_path, format_version="2"), "format_version 2 is not supported",
                 "newer ComfyUI-SVDQuant: update")
    expect_error(with_metadata(tmp_path, format_version="x"), "'format_version' must be an integer")
    expect_error(with_metadata(tmp_path, precision="int3"), "unknown precision 'int3'; known: int4, nvfp4")
    expect_error(with_metadata(tmp_path, group_size="128"), "group_size 128 does not match precision int4")
    expect_error(with_metadata(tmp_path, dtype="float32"), "unknown dtype 'float32'")
    expect_error(with_metadata(tmp_path, model_family=None), "'model_family' is missing")
    expect_error(with_metadata(tmp_path, model_config="[1]"), "'model_config' must be a JSON object")
    expect_error(with_metadata(tmp_path, layers='{"a": {"kind": "w4a4"}}'), "layer 'a' lacks 'in_features'")
    expect_error(with_metadata(tmp_path, layers='{"a": {"kind": "w8a8", "in_features": 64, "out_features": 8, '
                                                 '"bias": true}}'), "unknown layer kind 'w8a8'")
    expect_error(with_metadata(tmp_path, layers='{"a": {"kind": "w4a4", "in_features": 64, "out_features": 8, '
                                                 '"bias": true, "ranc": 3}}'), "unknown keys ['ranc']")
    expect_error(with_metadata(tmp_path, layers='{"a": {"kind": "w4a4", "in_features": 60, "out_features": 8, '
                                                 '"bias": true}}'), "not a multiple of the int4 group size 64")


def test_foreign_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"img_in.weight": torch.zeros(4, 4)}, plain)
    expect_error(plain, "not a ComfyUI-SVDQuant checkpoint")
    nunchaku = tmp_path / "svdq-int4_r32-flux.1-dev.safetensors"
    save_file({"x": torch.zeros(1)}, nunchaku, metadata={"quantization_config": "{}", "model_class": "x"})
    expect_error(nunchaku, "looks like a Nunchaku checkpoint")


def test_writer_refuses_an_invalid_checkpoint(tmp_path):
    info, tensors, _ = small_checkpoint()
    del tensors["blocks.0.qkv.smooth"]
    with pytest.raises(CheckpointError, match="'blocks.0.qkv.smooth' is missing"):
        fmt.save_checkpoint(tmp_path / "x.safetensors", info, tensors)
    assert not list(tmp_path.iterdir())


def split_checkpoint():
    """linear1 split by rows (two parts, one unsigned-free), linear2 split by columns."""
    g = torch.Generator().manual_seed(7)
    w1, b1 = torch.randn(80, 64, generator=g), torch.randn(80, generator=g)
    w2, b2 = torch.randn(32, 192, generator=g), torch.randn(32, generator=g)
    parts = {
        "blk.linear1.qkv": (quantize_w4a4(w1[:48], b1[:48], 4), ("rows", 0, 48)),
        "blk.linear1.mlp": (quantize_w4a4(w1[48:], b1[48:], 8), ("rows", 48, 80)),
        "blk.linear2.attn": (quantize_w4a4(w2[:, :64], b2, 4), ("cols", 0, 64)),
        "blk.linear2.mlp": (quantize_w4a4(w2[:, 64:], None, 4, act_unsigned=True), ("cols", 64, 192)),
    }
    specs = {name: dataclasses.replace(layer.spec(), part=part) for name, (layer, part) in parts.items()}
    tensors = {f"{name}.{k}": t for name, (layer, _) in parts.items() for k, t in layer.state_dict().items()}
    info = CheckpointInfo("int4", 4, torch.bfloat16, "flux.1", {}, specs)
    return info, tensors, (w1, b1, w2, b2)


def test_split_linears_round_trip_and_compute_the_whole_linear(tmp_path):
    info, tensors, (w1, b1, w2, b2) = split_checkpoint()
    path = tmp_path / "split.safetensors"
    fmt.save_checkpoint(path, info, tensors)
    got_info, got = fmt.load_checkpoint(path)
    assert got_info == info
    modules = got_info.modules()
    assert set(modules) == {"blk.linear1", "blk.linear2"} and set(modules["blk.linear1"]) == {"qkv", "mlp"}
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    h = torch.nn.functional.gelu(torch.randn(5, 192), approximate="tanh").bfloat16()
    for name, dense, inp in (("blk.linear1", lambda v: v @ w1.T + b1, x), ("blk.linear2", lambda v: v @ w2.T + b2, h)):
        module = make_module(modules[name], "int4", device="meta").to_empty(device="cpu")
        module.load_state_dict({k[len(name) + 1:]: v for k, v in got.items() if k.startswith(name + ".")})
        y = module(inp)
        assert y.shape == (5, module.out_features) and y.dtype == torch.bfloat16
        ref = dense(inp.float())
        assert float((y.float() - ref).norm() / ref.norm()) < 0.2
        # exactly the parts' outputs, concatenated (rows) or summed (columns)
        parts = {p: module.get_submodule(p) for p in module.spans}
        if module.mode == "rows":
            assert torch.equal(y, torch.cat([parts["qkv"](inp), parts["mlp"](inp)], -1))
        else:
            want = parts["attn"](inp[:, :64]).float() + parts["mlp"](inp[:, 64:]).float()
            assert torch.equal(y, want.bfloat16())


def test_split_linear_errors(tmp_path):
    info, tensors, _ = split_checkpoint()
    bad = dict(info.layers)
    bad["blk.linear1.mlp"] = dataclasses.replace(bad["blk.linear1.mlp"], part=("rows", 50, 82))
    expect_error(saved(tmp_path, dataclasses.replace(info, layers=bad), tensors),
                 "do not tile its rows: 'blk.linear1.mlp' starts at 50, expected 48")
    bad = dict(info.layers)
    bad["blk.linear2.mlp"] = dataclasses.replace(bad["blk.linear2.mlp"], part=("rows", 64, 100))
    expect_error(saved(tmp_path, dataclasses.replace(info, layers=bad), tensors), "'rows' [64, 100] does not span")
    bad["blk.linear2.mlp"] = dataclasses.replace(bad["blk.linear2.mlp"], part=("rows", 32, 64))
    expect_error(saved(tmp_path, dataclasses.replace(info, layers=bad), tensors), "the parts of 'blk.linear2' mix")
    extra = dict(tensors, **{"blk.linear1.weight": torch.zeros(80, 64)})
    expect_error(saved(tmp_path, info, extra), "'blk.linear1' is split into quantized parts")
    whole = dict(info.layers, **{"blk.linear1": fmt.LayerSpec("w4a4", 64, 80, True, 4)})
    expect_error(saved(tmp_path, dataclasses.replace(info, layers=whole), tensors),
                 "'blk.linear1' is declared both whole and split")
