"""The reference layers against an independent float64 computation of DESIGN.md §2.

The independent side is numpy: it unpacks the file-layout buffers itself, quantizes the
activations with numpy float32 arithmetic (the spec defines quantization in fp32: division in
fp32, round half to even), and does every sum in float64, group by group.
"""
import numpy as np
import pytest
import torch

from nunchaku_ext import backends
from nunchaku_ext.layers import SVDQW4A4Linear, W4A16Linear
from nunchaku_ext.quantize import quantize_w4a4, quantize_w4a16

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float64)


def np32(t):
    return t.detach().float().cpu().numpy()


def nibbles(packed):
    p = packed.cpu().numpy().astype(np.int64)
    return np.stack([p & 15, p >> 4], axis=-1).reshape(p.shape[0], -1)


def e2m1_nearest_even(v):
    """float32 array -> E2M1 values (float64), nearest with ties to the even code, saturating."""
    m = np.minimum(np.abs(v.astype(np.float64)), 6.0)
    dist = np.abs(m[..., None] - E2M1)
    best = np.where(dist == dist.min(-1, keepdims=True), np.arange(8) % 2, 9).argmin(-1)
    return np.copysign(E2M1[best], v) * (best > 0)


def independent_w4a4(layer, x):
    """float64 y for rows x [M, K] (numpy float32), from the layer's file-layout buffers."""
    M, K = x.shape
    xs = x.copy()
    if layer.act_unsigned:
        xs = xs + np.float32(0.171875)
    xs = xs / np32(layer.smooth)  # float32 division
    if layer.precision == "int4":
        G = 64
        w_codes = nibbles(layer.qweight)
        w_codes = np.where(w_codes >= 8, w_codes - 16, w_codes).astype(np.float64)
        w_scales = np32(layer.wscales).astype(np.float64)
        groups = xs.reshape(M, K // G, G)
        if layer.act_unsigned:
            sx = np.maximum(groups.max(-1), 0) / np.float32(15)
            q = np.clip(np.rint(groups / np.where(sx > 0, sx, 1)[..., None]), 0, 15)
        else:
            sx = np.abs(groups).max(-1) / np.float32(7)
            q = np.clip(np.rint(groups / np.where(sx > 0, sx, 1)[..., None]), -7, 7)
        alpha = 1.0
    else:
        G = 16
        w_nib = nibbles(layer.qweight)
        w_codes = E2M1[w_nib & 7] * np.where(w_nib >= 8, -1, 1)
        w_scales = np32(layer.wscales).astype(np.float64)
        groups = xs.reshape(M, K // G, G)
        sx = np32(torch.from_numpy(np.minimum(np.abs(groups).max(-1) / np.float32(6), np.float32(448)))
                  .to(torch.float8_e4m3fn))
        q = e2m1_nearest_even(groups / np.where(sx > 0, sx, 1)[..., None])
        alpha = float(layer.wtscale) * np32(layer.wcscales).astype(np.float64)[None, :]
    q = q.astype(np.float64) * (sx[..., None] > 0)
    y = np.zeros((M, layer.out_features))
    for g in range(K // G):
        dot = q[:, g] @ w_codes[:, g * G:(g + 1) * G].T
        y += dot * sx[:, g, None].astype(np.float64) * w_scales[g][None, :]
    y *= alpha
    xd = x.astype(np.float64)
    y += (xd @ np32(layer.lora_down).astype(np.float64).T) @ np32(layer.lora_up).astype(np.float64).T
    if layer.bias is not None:
        y += np32(layer.bias)
    return y


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make_input(M, K, unsigned, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * (torch.rand(K, generator=g).pow(6) * 20 + 1)
    if unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    return x.to(dtype)


CASES = [  # precision, unsigned, rank, bias, K, N, M
    ("int4", False, 0, True, 128, 48, 5),
    ("int4", False, 16, True, 256, 40, 17),
    ("int4", False, 5, False, 192, 33, 1),
    ("int4", True, 16, True, 256, 64, 9),
    ("int4", True, 0, True, 128, 24, 3),
    ("nvfp4", False, 0, True, 64, 40, 7),
    ("nvfp4", False, 16, False, 256, 48, 11),
    ("nvfp4", False, 3, True, 96, 20, 2),
]


@pytest.mark.parametrize("precision,unsigned,rank,bias,K,N,M", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_w4a4_matches_independent_float64(precision, unsigned, rank, bias, K, N, M, dtype):
    g = torch.Generator().manual_seed(K * N + M)
    weight = torch.randn(N, K, generator=g)
    smooth = torch.rand(K, generator=g) * 3 + 0.25
    layer = quantize_w4a4(weight, torch.randn(N, generator=g) if bias else None, rank, precision=precision,
                          smooth=smooth, act_unsigned=unsigned, dtype=dtype)
    if precision == "nvfp4":  # imported files carry per-channel factors; ours are ones
        layer.wcscales.copy_(torch.rand(N, generator=g) + 0.5)
    x = make_input(M, K, unsigned, seed=M, dtype=dtype)
    want = independent_w4a4(layer, np32(x))
    # fp32 input -> fp32 output: the reference agrees with float64 to fp32 accumulation rounding
    got32 = layer(x.float()).numpy()
    assert rel_err(got32, want) < 1e-5
    assert np.abs(got32 - want).max() <= 1e-4 * np.abs(want).max()
    # 16-bit input: the same, then one rounding of the output to the input's dtype
    got = layer(x)
    assert got.dtype == dtype
    assert np.allclose(np32(got), want, rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10,
                       atol=1e-4 * np.abs(want).max())


def test_batched_and_noncontiguous_input():
    layer = quantize_w4a4(torch.randn(32, 128), torch.randn(32), 8)
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)[..., ::2]  # non-contiguous [2, 3, 128]
    y = layer(x)
    assert y.shape == (2, 3, 32)
    assert torch.equal(y, layer(x.contiguous().reshape(6, 128)).reshape(2, 3, 32))


def test_quantized_output_close_to_dense():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(64, 256, generator=g), torch.randn(64, generator=g)
    x = make_input(16, 256, False, seed=1).float()
    dense = x @ w.T + b
    for precision in ("int4", "nvfp4"):
        y = quantize_w4a4(w, b, 16, precision=precision)(x)
        assert rel_err(y.numpy(), dense.numpy()) < 0.2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w4a16_matches_independent_float64(dtype):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(40, 192, generator=g), torch.randn(40, generator=g)
    layer = quantize_w4a16(w, b, dtype=dtype)
    codes = nibbles(layer.qweight).astype(np.float64)
    scales = np.repeat(np32(layer.wscales).T.astype(np.float64), 64, axis=1)
    zeros = np.repeat(np32(layer.wzeros).T.astype(np.float64), 64, axis=1)
    x = torch.randn(3, 192, generator=g).to(dtype)
    want = np32(x).astype(np.float64) @ (codes * scales + zeros).T + np32(layer.bias)
    assert rel_err(layer(x.float()).numpy(), want) < 1e-6
    assert rel_err(np32(layer(x)), want) < 2e-3
    assert rel_err(np32(layer(x)), np32(x @ w.T.to(dtype) + b.to(dtype))) < 0.15


def test_buffers_are_the_real_quantized_tensors():
    layer = SVDQW4A4Linear(3072, 3072, 32, dtype=torch.bfloat16, device="meta")
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "wscales", "smooth", "lora_down", "lora_up", "bias"}
    assert sd["qweight"].dtype == torch.uint8 and sd["qweight"].shape == (3072, 1536)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    assert nbytes < 0.3 * 3072 * 3072 * 2  # about 4.5 bits per weight incl. scales and rank 32
    assert not list(layer.parameters())
    fp4 = SVDQW4A4Linear(128, 16, 0, bias=False, precision="nvfp4", device="meta")
    assert set(fp4.state_dict()) == {"qweight", "wscales", "wtscale", "wcscales", "smooth", "lora_down", "lora_up"}
    assert fp4.state_dict()["wscales"].dtype == torch.float8_e4m3fn and fp4.rank == 0
    assert set(W4A16Linear(128, 16, device="meta").state_dict()) == {"qweight", "wscales", "wzeros", "bias"}


def test_to_moves_buffers_and_state_dict_round_trips():
    src = quantize_w4a4(torch.randn(16, 64), torch.randn(16), 4, dtype=torch.float16)
    dst = SVDQW4A4Linear(64, 16, 4, dtype=torch.float16, device="meta").to_empty(device="cpu")
    dst.load_state_dict(src.state_dict())
    x = torch.randn(2, 64, dtype=torch.float16)
    assert torch.equal(src(x), dst(x))
    assert dst.to(torch.device("cpu")).qweight.device.type == "cpu"


def test_invalid_construction_and_input():
    with pytest.raises(ValueError, match="multiple of the int4 group size 64"):
        SVDQW4A4Linear(100, 16, 4)
    with pytest.raises(ValueError, match="multiple of the nvfp4 group size 16"):
        SVDQW4A4Linear(72, 16, 4, precision="nvfp4")
    with pytest.raises(ValueError, match="int4 only"):
        SVDQW4A4Linear(64, 16, 4, precision="nvfp4", act_unsigned=True)
    with pytest.raises(ValueError, match="unknown precision"):
        SVDQW4A4Linear(64, 16, 4, precision="int8")
    with pytest.raises(ValueError, match="unsupported dtype"):
        SVDQW4A4Linear(64, 16, 4, dtype=torch.float32)
    layer = quantize_w4a4(torch.randn(16, 64), None, 4)
    with pytest.raises(ValueError, match="input has 32 features"):
        layer(torch.randn(2, 32))
    layer.backend = "nope"
    with pytest.raises(ValueError, match="unknown backend 'nope'; available: .*reference"):
        layer(torch.randn(2, 64))
    assert "reference" in backends.names()
