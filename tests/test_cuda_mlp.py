"""The fused MLP pair (backends.cuda.mlp_w4a4, csrc/w4a4_mlp.cuh) against its spec
(backends/reference_mlp.py: fc2(GELU_tanh(fc1(x))) on the reference backend).

GPU tests skip without CUDA; each runs once per INT4 MMA path the GPU has (fixture `mma_path`).
What they hold the fused kernel to:

* h, the hidden activation, is fc1's output rounded to the dtype, GELU(tanh) in fp32, rounded again.
  fc1's fp32 sum is the unfused GEMM's (same main loop and epilogue order), so h must equal
  F.gelu(cuda fc1(x)) up to the last bits of tanhf: at most one ulp of the dtype.
* fc2's input codes and scales EQUAL numerics.quantize_act_int4(smooth_input(h, smooth2, unsigned),
  unsigned) on the kernel's own h, bit for bit (same fp32 operations as kernel A).
* lora_act2 = h·D2ᵀ in fp32 summed in another order: 128 products per column block, then the blocks in
  order. Recursive fp32 summation of n terms errs by at most n·2^-24·Σ|terms|, n = 128 + blocks.
* fc2's output on the kernel's h within the linear tolerance of tests/test_cuda_w4a4.py:
      eps(dtype)·max(|y|, |y_ref|) + 2^-16·S, S = the sum of the absolute terms.
* The whole MLP against the spec: the two differ only where fc1's fp32 sum rounds to another
  16-bit value (or tanhf differs), which moves one h by an ulp and at most a code or a group scale
  of fc2's input; relative Frobenius error <= 2^-10 (a wrong group, scale or low-rank term gives
  1e-2 and more).
* Outputs are poisoned first: NaN for floats, every nibble 8 for codes. Unsigned codes can be 8, but
  a poisoned 16-byte word passes only if all its 32 codes are 8, and rows past M must be 0.
"""
import functools
import os

import pytest
import torch
import torch.nn.functional as F

from nunchaku_ext import numerics
from nunchaku_ext.backends import cuda as cuda_backend
from nunchaku_ext.backends import reference, reference_mlp
from nunchaku_ext.layers import SVDQW4A4Linear
from nunchaku_ext.quantize import quantize_w4a4
from test_cuda_w4a4 import (FLAVOURS, ext, launched_kernels, make_input, make_layer, mma_path,  # noqa: F401 (fixtures)
                            requires_cuda)


@pytest.fixture(autouse=True)
def always_fuse(monkeypatch):
    """These tests hold the fused kernels to the spec: fuse at any M, also where the pair would otherwise
    run as two wgmma linears for being large (test_fuses_only_where_it_pays_beside_wgmma checks that)."""
    monkeypatch.setattr(cuda_backend, "FUSED_MLP_MAX_ROWS_BESIDE_WGMMA", 2 ** 31)


MLP_CASES = [
    # input shape, K1 (model width), N1 (hidden), N2, rank fc1, rank fc2, dtype
    ((4096,), 3072, 12288, 3072, 32, 32, torch.bfloat16),  # FLUX
    ((4608,), 3072, 12288, 3072, 32, 16, torch.float16),
    ((1,), 3072, 12288, 3072, 16, 7, torch.bfloat16),
    ((3,), 256, 192, 320, 0, 16, torch.float16),  # hidden widths: multiples of 64, not of the 128 tile
    ((255,), 320, 448, 200, 7, 0, torch.bfloat16),
    ((2, 65), 192, 64, 136, 32, 7, torch.float16),
    ((130,), 128, 320, 2, 16, 32, torch.bfloat16),
]


def make_pair(K1, N1, N2, r1, r2, dtype, seed):
    fc1 = make_layer(N1, K1, r1, dtype=dtype, seed=seed)
    fc2 = make_layer(N2, N1, r2, unsigned=True, dtype=dtype, seed=seed + 1)
    return fc1, fc2


@functools.lru_cache(maxsize=None)
def spec(case):
    """(fc1, fc2, x, h_spec, y_spec) of a case: the reference does not depend on the MMA path."""
    shape, K1, N1, N2, r1, r2, dtype = case
    fc1, fc2 = make_pair(K1, N1, N2, r1, r2, dtype, seed=N1 + r2)
    x = make_input(shape, K1, unsigned=False, dtype=dtype, seed=K1)
    h = reference_mlp.hidden(fc1, x)
    return fc1, fc2, x, h, reference_mlp.mlp_w4a4(fc1, fc2, x)


def abs_terms(layer, x2):
    """S: the sum of the absolute terms of the linear on rows x2 (the scale of its fp32 reordering error).
    Only a tolerance scale, so its FLUX-sized matmul may run in TF32 (S off by < 2^-10 relative)."""
    xs = numerics.smooth_input(x2, layer.smooth, layer.act_unsigned)
    codes, sx = numerics.quantize_act_int4(xs, layer.act_unsigned)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        S = (codes.float().abs() * numerics.expand_groups(sx, 64)) @ layer.dequantized_residual().abs().T
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    if layer.rank:
        S += (x2.float() @ layer.lora_down.float().T).abs() @ layer.lora_up.float().abs().T
    return S + layer.bias.float().abs()


_fc2_on_h = {}  # case -> (h, fc2 by the reference on h, S): every MMA path computes the same h


def fc2_spec_on(case, fc2, h):
    if case not in _fc2_on_h or not torch.equal(_fc2_on_h[case][0], h):
        _fc2_on_h[case] = (h, reference.w4a4_linear(fc2, h), abs_terms(fc2, h))
    return _fc2_on_h[case][1:]


def check_fc2_input(fc1, fc2, x):
    """The fused kernel's outputs against the spec on its own h; returns h."""
    M, N1 = x.reshape(-1, fc1.in_features).shape[0], fc1.out_features
    h, codes, scales, lora_act2, (act_raw, scales_raw, lora_raw) = cuda_backend.mlp_fc2_input(fc1, fc2, x, poison=True)
    assert not h.isnan().any(), "unwritten (NaN-poisoned) h"
    # h: fc1 as the unfused linear of the fused kernels' MMA path computes it, then torch's GELU(tanh), to one
    # ulp. (The fused kernels are mma.sync ones: beside the wgmma path that is its fallback, whose low-rank
    # branch differs from the wgmma GEMM's in the last bits.)
    forced = os.environ.get(cuda_backend.PATH_ENV)
    os.environ[cuda_backend.PATH_ENV] = cuda_backend._mma_sync_path(cuda_backend.mma_path(x.device)).name
    try:
        h_unfused = F.gelu(cuda_backend.forward(fc1, x).reshape(M, N1), approximate="tanh")
    finally:
        if forced is None:
            del os.environ[cuda_backend.PATH_ENV]
        else:
            os.environ[cuda_backend.PATH_ENV] = forced
    dtype = torch.finfo(x.dtype)
    assert ((h.float() - h_unfused.float()).abs() <= dtype.eps * h_unfused.float().abs() + dtype.tiny * dtype.eps).all()

    ref_codes, ref_scales = numerics.quantize_act_int4(numerics.smooth_input(h, fc2.smooth, True), True)
    assert torch.equal(scales, ref_scales), f"scales differ at {(scales != ref_scales).nonzero()[:5].tolist()}"
    assert torch.equal(codes, ref_codes.to(codes.dtype)), f"codes differ at {(codes != ref_codes).nonzero()[:5].tolist()}"
    # Rows past M (tile padding) are written, as zeros: fc2's GEMM reads them.
    assert not scales_raw.isnan().any() and not lora_raw.isnan().any()
    assert (scales_raw[:, M:] == 0).all() and (lora_raw[M:] == 0).all() and (lora_raw[:, fc2.rank:] == 0).all()
    assert torch.equal(act_raw[:M].cpu(), numerics.pack_4bit(ref_codes).cpu())  # the layout kernel A writes
    assert (act_raw[M:] == 0).all()
    if fc2.rank:
        terms = h.double().abs() @ fc2.lora_down.double().abs().T
        n = 128 + -(-N1 // 128)  # summands per element: the column block's 128 in order, then one per block
        err = (lora_act2.double() - h.double() @ fc2.lora_down.double().T).abs()
        assert (err <= n * 2 ** -24 * terms + 1e-30).all(), (err / terms.clamp_min(1e-30)).max().item()
    return h


@requires_cuda
@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}-{c[3]}-r{c[4]}r{c[5]}-{str(c[6])[6:]}")
def test_mlp_matches_reference(mma_path, case):
    fc1, fc2, x, h_spec, y_spec = spec(case)
    h = check_fc2_input(fc1, fc2, x)

    out = torch.full((*x.shape[:-1], fc2.out_features), float("nan"), dtype=x.dtype, device=x.device)
    y = cuda_backend.mlp_w4a4(fc1, fc2, x, out=out)
    assert y.data_ptr() == out.data_ptr() and y.shape == y_spec.shape and not y.isnan().any()
    # fc2 on the kernel's h: the linear's own tolerance (tests/test_cuda_w4a4.py: check_linear).
    y_on_h, S = fc2_spec_on(case, fc2, h)
    yf, rf = y.float().reshape(S.shape), y_on_h.float()
    tol = torch.finfo(x.dtype).eps * torch.maximum(yf.abs(), rf.abs()) + 2 ** -16 * S
    assert ((yf - rf).abs() <= tol).all(), ((yf - rf).abs() / tol).max().item()
    # The whole MLP against the spec.
    rel = ((y.float() - y_spec.float()).norm() / y_spec.float().norm()).item()
    h_moved = (h.reshape(h_spec.shape) != h_spec).float().mean().item()
    print(f"\n{case}: rel. Frobenius error {rel:.2e}, h elements not equal to the spec's {h_moved:.2e}")
    assert rel <= 2 ** -10


@requires_cuda
def test_mlp_is_deterministic_and_fused(mma_path):
    """Same output bits every run (no atomics), and the pair really takes the fused kernels."""
    fc1, fc2 = make_pair(512, 1024, 384, 32, 32, torch.bfloat16, seed=5)
    x = make_input((999,), 512, unsigned=False, dtype=torch.bfloat16)
    y0 = cuda_backend.mlp_w4a4(fc1, fc2, x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            assert torch.equal(cuda_backend.mlp_w4a4(fc1, fc2, x), y0)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    fused = [n for n in names if "w4a4_mlp_fc1_kernel" in n]
    assert len(fused) == 3 and all(FLAVOURS[mma_path.name] in n for n in fused), names
    assert sum("sum_lora_partials_kernel" in n for n in names) == 3, names
    assert sum("quantize_act_lora_down_kernel" in n for n in names) == 3, names  # fc1's only


@requires_cuda
def test_fuses_only_where_it_pays_beside_wgmma(ext, monkeypatch):
    """On sm_90 the pair is fused up to FUSED_MLP_MAX_ROWS_BESIDE_WGMMA rows and runs as two wgmma
    linears above (the fused kernels are mma.sync ones; docs/benchmarks.md)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma path is sm_90's")
    monkeypatch.delenv(cuda_backend.PATH_ENV, raising=False)
    monkeypatch.setattr(cuda_backend, "FUSED_MLP_MAX_ROWS_BESIDE_WGMMA", 512)
    fc1, fc2 = make_pair(256, 512, 256, 16, 16, torch.bfloat16, seed=9)  # shapes the wgmma path takes
    for M, fused in ((512, True), (513, False)):
        x = make_input((M,), 256, unsigned=False, dtype=torch.bfloat16)
        names = launched_kernels(lambda: cuda_backend.mlp_w4a4(fc1, fc2, x))
        y = cuda_backend.mlp_w4a4(fc1, fc2, x)
        assert any("w4a4_mlp_fc1_kernel" in n for n in names) == fused, (M, names)
        assert sum("w4a4_gemm_sm90a_kernel" in n for n in names) == (0 if fused else 2), (M, names)
        two = cuda_backend.forward(fc2, F.gelu(cuda_backend.forward(fc1, x), approximate="tanh"))
        assert ((y.float() - two.float()).norm() / two.float().norm()).item() <= 2 ** -10


@requires_cuda
def test_unfusable_pairs_run_as_two_linears(ext):
    """NVFP4 pairs, and INT4 pairs whose fc2 input is signed, fall back to fc2(gelu(fc1(x)))."""
    torch.manual_seed(7)
    for precision, unsigned in (("nvfp4", False), ("int4", False)):
        fc1 = quantize_w4a4(torch.randn(256, 192, device="cuda") / 14, torch.randn(256, device="cuda"), rank=16,
                            precision=precision)
        fc2 = quantize_w4a4(torch.randn(128, 256, device="cuda") / 16, torch.randn(128, device="cuda"), rank=16,
                            precision=precision, act_unsigned=unsigned)
        fc1.backend = fc2.backend = "cuda"
        assert not cuda_backend.mlp_fusable(fc1, fc2)
        x = make_input((70,), 192, unsigned=False, dtype=torch.bfloat16)
        two = cuda_backend.forward(fc2, F.gelu(cuda_backend.forward(fc1, x), approximate="tanh"))
        assert torch.equal(cuda_backend.mlp_w4a4(fc1, fc2, x), two)


def test_mismatched_pair_is_refused():
    fc1 = SVDQW4A4Linear(64, 128, 0)
    fc2 = SVDQW4A4Linear(192, 64, 0, bias=True, act_unsigned=True)
    with pytest.raises(ValueError, match="fc1 has 128 outputs but fc2 takes 192 inputs"):
        cuda_backend.mlp_w4a4(fc1, fc2, torch.zeros(2, 64))
