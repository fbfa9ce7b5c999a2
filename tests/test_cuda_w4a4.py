"""The 'cuda' backend's W4A4 INT4 kernels against the reference backend (the spec).

GPU tests skip without CUDA. What they hold the kernels to:

* Kernel A (activation quantize): codes and scales EQUAL numerics.quantize_act_int4(smooth_input(x))
  bit for bit (same fp32 operations: add, IEEE division, round half to even). lora_act = x·Dᵀ is
  fp32 with another summation order: |Δ| <= 2^-16 · (|x|·|D|ᵀ).
* The spec is evaluated on the CPU. On CUDA tensors torch computes `tensor / python_scalar` as
  tensor * (1/scalar) (aten BinaryDivTrueKernel.cu, "may lose one bit"), so numerics' `amax / 7.0`
  gives a scale one ulp off the true fp32 division in some groups, and then other codes. On the CPU
  torch divides. The kernels implement the written spec, true division (see docs/kernels.md).
* The whole linear: y within
      |y_cuda - y_ref| <= eps(dtype) · max(|y_cuda|, |y_ref|) + 2^-16 · S,
      S = |Q(xs)·sx| · |Q(W)·sw|ᵀ + |x·Dᵀ| · |U|ᵀ + |bias|   (the sum of the absolute terms).
  Why: both compute every group's integer dot product exactly and scale/sum it in fp32; only the
  order of the fp32 additions (over K/64 groups and the rank) differs, an error of a few fp32 ulps
  of S (2^-16 = 128 ulps of headroom). Then each rounds once to bf16/fp16: two roundings of values
  that differ by δ differ by at most δ plus one ulp of the output, eps(dtype)·|y|. A wrong group,
  a missing term or a layout error moves y by about S / sqrt(terms), orders of magnitude more.
* Outputs are pre-filled with NaN (and codes with a nibble the kernel never writes) before each
  run, so an element the kernels fail to write fails the test.
* Every W4A4 GPU test runs once per MMA path the GPU has (fixture `mma_path`, which forces it with
  $SVDQ_MMA_PATH): on sm_90 all three, the consumer GPUs' s4 paths emulated by ptxas but with the
  same instruction semantics, so their layouts, fragment mapping and MMA chains are verified there.
  The paths must also agree with each other bit for bit (same exact group sums, same fp32 order).
  sm_90 also runs its wgmma path (e4m3_wgmma_sm90a, csrc/w4a4_sm90a.cu), which takes INT4 layers with N
  and K multiples of 128; the other shapes fall back to s8_m16n8k32 under it, and still pass.

The test marked `build` compiles and links the extension for every supported arch (no GPU needed,
nvcc needed); it takes minutes.
"""
import math
import os
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from nunchaku_ext import cuda_build, numerics
from nunchaku_ext.backends import cuda as cuda_backend
from nunchaku_ext.backends import reference
from nunchaku_ext.layers import SVDQW4A4Linear
from nunchaku_ext.quantize import quantize_w4a4

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FLUX_NK = [(9216, 3072), (3072, 3072), (12288, 3072), (3072, 12288), (21504, 3072), (3072, 15360)]


@pytest.fixture(scope="module")
def ext():
    # A GPU is present: a build failure is a failure, not a skip.
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference's fp32 matmuls stay fp32
    return cuda_build.load()


def make_layer(N, K, rank, *, unsigned=False, dtype=torch.bfloat16, bias=True, device="cuda", seed=0):
    """A layer with random valid contents (fast for FLUX sizes; quantize_w4a4 runs an SVD)."""
    g = torch.Generator(device=device).manual_seed(seed)
    layer = SVDQW4A4Linear(K, N, rank, bias=bias or unsigned, act_unsigned=unsigned, dtype=dtype, device=device)
    codes = torch.randint(-8, 8, (N, K), generator=g, device=device)  # files may hold -8
    layer.qweight.copy_(numerics.pack_4bit(codes))
    layer.wscales.copy_((torch.rand(K // 64, N, generator=g, device=device) * 0.02 + 1e-3).to(dtype))
    layer.smooth.copy_((torch.rand(K, generator=g, device=device) * 1.5 + 0.25).to(dtype))
    layer.lora_down.copy_((torch.randn(rank, K, generator=g, device=device) / math.sqrt(K)).to(dtype))
    layer.lora_up.copy_((torch.randn(N, rank, generator=g, device=device) * 0.1).to(dtype))
    if layer.bias is not None:
        layer.bias.copy_(torch.randn(N, generator=g, device=device).to(dtype))
    layer.backend = "cuda"
    return layer


def make_input(shape, K, *, unsigned, dtype, device="cuda", seed=1):
    g = torch.Generator(device=device).manual_seed(seed)
    if unsigned:  # a GELU output, plus a few values below -0.171875 (negative after the shift -> code 0)
        x = F.gelu(torch.randn(*shape, K, generator=g, device=device) * 2, approximate="tanh")
        x.view(-1)[:: 97] = -0.5
        x.view(-1)[1:: 89] = -0.171875  # exactly 0 after the shift (a zero dividend of the smooth division)
    else:  # per-channel outliers, so groups see very different ranges
        x = torch.randn(*shape, K, generator=g, device=device)
        x = x * torch.exp(torch.randn(K, generator=g, device=device))
    x = x.to(dtype)
    rows = x.view(-1, K)
    rows[:: 5, :64] = 0  # all-zero groups: scale 0, codes 0
    if rows.shape[0] > 2:
        rows[1] = 0  # an all-zero row
    return x


# The kernel template instantiation of each MMA path (csrc/w4a4_int8.cu, csrc/w4a4_s4.cuh), and its
# SASS instruction where the GPU runs it natively, for (signed, unsigned) activations.
FLAVOURS = {"s8_m16n8k32": "MmaS8m16n8k32", "s4_m16n8k64": "MmaS4m16n8k64", "s4_m8n8k32": "MmaS4m8n8k32",
            # sm_90's wgmma path has its own GEMM (w4a4_gemm_sm90a_kernel, WGMMA_KERNEL); its fallback (the
            # fused MLP pair, the shapes it does not take) runs on the s8 flavour (backends.cuda.WGMMA_FALLBACK).
            "e4m3_wgmma_sm90a": "MmaS8m16n8k32"}
WGMMA_KERNEL, WGMMA_SASS = "w4a4_gemm_sm90a_kernel", "QGMMA.64x"  # m64n128 / m64n64 tiles, k32 E4M3
NVFP4_FLAVOURS = {"e2m1_s8_m16n8k16": "MmaE2M1S8m16n8k16", "e2m1_bs_m16n8k64": "MmaE2M1BlockScaledM16n8k64"}
EXPECTED_IMMA = {"s8_m16n8k32": ("IMMA.16832.S8.S8", "IMMA.16832.S8.S8"),
                 "s4_m16n8k64": ("IMMA.16864.S4.S4", "IMMA.16864.U4.S4"),
                 "s4_m8n8k32": ("IMMA.8832.S4.S4", "IMMA.8832.U4.S4")}


@pytest.fixture(params=list(cuda_backend.MMA_PATHS))
def mma_path(request, ext, monkeypatch):
    """Runs a test on one MMA path, forced; skipped where the GPU lacks the instruction."""
    path = cuda_backend.MMA_PATHS[request.param]
    capability = torch.cuda.get_device_capability()
    if capability < path.min_capability or (path.exact_capability and capability != path.min_capability):
        pytest.skip(f"{path.name} needs sm_{path.min_capability[0]}{path.min_capability[1]}")
    monkeypatch.setenv(cuda_backend.PATH_ENV, path.name)
    return path


def launched_kernels(fn):
    """The names of the CUDA kernels that fn() launches, seen by the profiler after one call that builds
    and warms up."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()]


def reference_linear(layer, x):
    return reference.w4a4_linear(layer, x)


def check_quantize(layer, x):
    x2 = x.reshape(-1, layer.in_features)
    xs = numerics.smooth_input(x2, layer.smooth, layer.act_unsigned)
    ref_codes, ref_scales = numerics.quantize_act_int4(xs, layer.act_unsigned)
    codes, scales, lora_act, (act_raw, scales_raw, lora_raw) = cuda_backend.quantize_act(layer, x, poison=True)
    M = x2.shape[0]
    assert torch.equal(scales, ref_scales), f"scales differ at {(scales != ref_scales).nonzero()[:5].tolist()}"
    assert torch.equal(codes, ref_codes), f"codes differ at {(codes != ref_codes).nonzero()[:5].tolist()}"
    # Padded rows (M .. M_pad) must be written too, as zeros: the GEMM reads them.
    assert not scales_raw.isnan().any() and not lora_raw.isnan().any()
    assert (scales_raw[:, M:] == 0).all() and (lora_raw[M:] == 0).all()
    # The codes are stored as the file stores weights (row-major, two per byte, low nibble = even k).
    assert torch.equal(act_raw[:M].cpu(), numerics.pack_4bit(ref_codes).cpu())
    assert (act_raw[M:] == 0).all()
    assert (lora_raw[:, layer.rank:] == 0).all()
    if layer.rank:
        ref = x2.double() @ layer.lora_down.double().T
        bound = x2.double().abs() @ layer.lora_down.double().abs().T
        assert ((lora_act.double() - ref).abs() <= 2 ** -16 * bound + 1e-30).all()


def check_linear(layer, x, *, via_module=False):
    N = layer.out_features
    y_ref = reference_linear(layer, x)
    if via_module:
        y = layer(x)
    else:
        out = torch.full((*x.shape[:-1], N), float("nan"), dtype=x.dtype, device=x.device)
        y = cuda_backend.forward(layer, x, out=out)
        assert y.data_ptr() == out.data_ptr()
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    assert not y.isnan().any(), "unwritten (NaN-poisoned) output elements"

    # S: the sum of absolute terms, the scale of fp32 reordering error.
    K = layer.in_features
    x2 = x.reshape(-1, K)
    xs = numerics.smooth_input(x2, layer.smooth, layer.act_unsigned)
    if layer.precision == "int4":
        codes, sx = numerics.quantize_act_int4(xs, layer.act_unsigned)
        deq_x = codes.float().abs() * numerics.expand_groups(sx, 64)
    else:
        codes, sx = numerics.quantize_act_nvfp4(xs)
        deq_x = numerics.e2m1_to_float(codes).abs() * numerics.expand_groups(sx.float(), 16)
    S = deq_x @ layer.dequantized_residual().abs().T  # dequantized_residual includes wtscale, wcscales
    if layer.rank:
        S += (x2.float() @ layer.lora_down.float().T).abs() @ layer.lora_up.float().abs().T
    if layer.bias is not None:
        S += layer.bias.float().abs()
    S = S.reshape(y.shape)
    yf, rf = y.float(), y_ref.float()
    eps = torch.finfo(x.dtype).eps
    rel = 2 ** -16
    if cuda_backend.layer_mma_path(layer, x.device) is cuda_backend.NVFP4_BLOCK_SCALED_PATH:
        rel += 3 * -(-K // 64) * 2 ** -29  # sm_120's tensor-core fp32 accumulation (test_cuda_nvfp4.py)
    tol = eps * torch.maximum(yf.abs(), rf.abs()) + rel * S
    err = (yf - rf).abs()
    worst = (err / tol.clamp_min(1e-30)).max().item()
    if os.environ.get("SVDQ_TEST_REPORT"):  # margin statistics for docs/kernels.md
        ulps = (err / (eps * torch.maximum(yf.abs(), rf.abs())).clamp_min(1e-30))
        with open(os.environ["SVDQ_TEST_REPORT"], "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\tM={x2.shape[0]} N={N} K={K} "
                    f"r={layer.rank} unsigned={layer.act_unsigned} {str(x.dtype)[6:]}\tmax err/tol={worst:.3f}\t"
                    f"not bit-equal={(y != y_ref).float().mean().item():.2e}\tmax err in output ulps={ulps.max().item():.2f}\n")
    assert (err <= tol).all(), f"max err/tol {worst:.3g}, max err {err.max().item():.3g}"
    return worst


# ------------------------------------------------------------------------------------------------
# Layout tests: no GPU needed. They emulate what each lane of the GEMM loads and how it builds its
# fragments (csrc/w4a4_int8.cu "Which k a lane owns", Lane16Layout; csrc/w4a4_s4.cuh), then apply the
# PTX ISA's fragment definitions of the MMA: every 16x8 tile must get the exact integer product of
# its 64-chunk. Both operands are row-major packed codes, as the file stores weights and kernel A
# writes activations.


def lane16_run_k(j, tid):
    return 16 * tid + 4 * j  # Lane16Layout::run_k


def lane_words(packed, row, g, tid, run_k):
    """A lane's two words of `row`'s 64-chunk g, as load_words reads them: run j is the 16 bits at
    byte run_k(j, tid) / 2 of the row's 32-byte chunk; word w = run 2w | run 2w+1 << 16."""
    chunk = packed[row, 32 * g:32 * g + 32]
    runs = [int(chunk[run_k(j, tid) // 2]) | int(chunk[run_k(j, tid) // 2 + 1]) << 8 for j in range(4)]
    return runs[0] | runs[1] << 16, runs[2] | runs[3] << 16


def _s8_bytes(word, signed):
    """unpack_nibbles_to_s8: a word -> (low register bytes = even nibbles, high register bytes = odd)."""
    lo = [(word >> (8 * b)) & 0xF for b in range(4)]
    hi = [(word >> (8 * b + 4)) & 0xF for b in range(4)]
    if signed:
        lo = [v - 16 if v >= 8 else v for v in lo]
        hi = [v - 16 if v >= 8 else v for v in hi]
    return lo, hi


def _chunk_operands(seed, M=32, N=40, K=128):
    torch.manual_seed(seed)
    a = torch.randint(-8, 8, (M, K))
    w = torch.randint(-8, 8, (N, K))
    return a, w, numerics.pack_4bit(a), numerics.pack_4bit(w)


def test_int8_flavour_fragments_match_ptx_mma():
    """MmaS8m16n8k32: a word's low / high register, per k32 MMA v: a0 / a1 = low of rows gid / gid+8
    (word v), a2 / a3 = their high; b0 / b1 = the weight row's low / high."""
    a, w, a_packed, w_packed = _chunk_operands(0)
    M, K = a.shape
    for g in range(K // 64):
        for mt in range(M // 16):
            for t in range(w.shape[0] // 8):
                want = a[16 * mt:16 * mt + 16, 64 * g:64 * g + 64] @ w[8 * t:8 * t + 8, 64 * g:64 * g + 64].T
                got = torch.zeros(16, 8, dtype=torch.long)
                for v in range(2):
                    A = torch.zeros(16, 32, dtype=torch.long)
                    B = torch.zeros(32, 8, dtype=torch.long)
                    for lane in range(32):
                        gid, tid = lane // 4, lane % 4
                        r0 = lane_words(a_packed, 16 * mt + gid, g, tid, lane16_run_k)[v]
                        r1 = lane_words(a_packed, 16 * mt + 8 + gid, g, tid, lane16_run_k)[v]
                        lo0, hi0 = _s8_bytes(r0, True)
                        lo1, hi1 = _s8_bytes(r1, True)
                        regs = (lo0, lo1, hi0, hi1)  # a0..a3 as a_frag builds them
                        blo, bhi = _s8_bytes(lane_words(w_packed, 8 * t + gid, g, tid, lane16_run_k)[v], True)
                        for b in range(4):  # PTX m16n8k32 .s8: A row gid (+8 for a1, a3), k tid*4+b (+16 for a2, a3)
                            for r in range(4):
                                A[gid + 8 * (r % 2), 16 * (r // 2) + 4 * tid + b] = regs[r][b]
                            B[4 * tid + b, gid] = blo[b]  # b0: k tid*4+b, col gid; b1: k 16+tid*4+b
                            B[16 + 4 * tid + b, gid] = bhi[b]
                    got += A @ B
                assert torch.equal(got, want)


def _s4_codes(word):
    """A 32-bit s4 MMA register -> its 8 signed codes, element e in bits 4e (PTX: low to high)."""
    return [((word >> 4 * e) & 0xF) - 16 * ((word >> (4 * e + 3)) & 1) for e in range(8)]


def test_native_s4_fragments_match_ptx_mma():
    """Both s4 flavours (the words are the registers: a = {w0 row gid, w0 row gid+8, w1 row gid, w1
    row gid+8}, b = {w0, w1}) give each 16x8 tile's integer product: one m16n8k64, and the four
    m8n8k32 that MmaS4m8n8k32 chains."""
    a, w, a_packed, w_packed = _chunk_operands(1)
    M, K = a.shape
    for g in range(K // 64):
        for mt in range(M // 16):
            a_regs = []
            for lane in range(32):
                gid, tid = lane // 4, lane % 4
                w0, w1 = lane_words(a_packed, 16 * mt + gid, g, tid, lane16_run_k)
                v0, v1 = lane_words(a_packed, 16 * mt + 8 + gid, g, tid, lane16_run_k)
                a_regs.append([_s4_codes(r) for r in (w0, v0, w1, v1)])
            for t in range(w.shape[0] // 8):
                b_regs = [[_s4_codes(r) for r in lane_words(w_packed, 8 * t + lane // 4, g, lane % 4, lane16_run_k)]
                          for lane in range(32)]
                want = a[16 * mt:16 * mt + 16, 64 * g:64 * g + 64] @ w[8 * t:8 * t + 8, 64 * g:64 * g + 64].T
                # m16n8k64: A element i -> register i // 8, row gid (+8 unless i < 8 or 16 <= i < 24),
                # k tid*8 + i%8 (+32 for i >= 16); B element i -> register i // 8, k tid*8 + i%8 (+32 for i >= 8)
                A = torch.zeros(16, 64, dtype=torch.long)
                B = torch.zeros(64, 8, dtype=torch.long)
                for lane in range(32):
                    gid, tid = lane // 4, lane % 4
                    for i in range(32):
                        row = gid if i < 8 or 16 <= i < 24 else gid + 8
                        A[row, tid * 8 + (i & 7) + (32 if i >= 16 else 0)] = a_regs[lane][i // 8][i % 8]
                    for i in range(16):
                        B[tid * 8 + (i & 7) + (32 if i >= 8 else 0), gid] = b_regs[lane][i // 8][i % 8]
                assert torch.equal(A @ B, want)

                # m8n8k32: A row gid, k tid*8 + e; B k tid*8 + e, col gid; C row gid
                def m8n8k32(ra, rb):
                    A8 = torch.zeros(8, 32, dtype=torch.long)
                    B8 = torch.zeros(32, 8, dtype=torch.long)
                    for lane in range(32):
                        gid, tid = lane // 4, lane % 4
                        A8[gid, tid * 8:tid * 8 + 8] = torch.tensor(a_regs[lane][ra])
                        B8[tid * 8:tid * 8 + 8, gid] = torch.tensor(b_regs[lane][rb])
                    return A8 @ B8

                rows_gid = m8n8k32(0, 0) + m8n8k32(2, 1)
                rows_gid8 = m8n8k32(1, 0) + m8n8k32(3, 1)
                assert torch.equal(torch.cat([rows_gid, rows_gid8]), want)


# The sm_90a wgmma path (csrc/w4a4_sm90a.cu; kernel A's Lane16E4M3Layout store in w4a4_int8.cu).


def _e4m3_bytes_like_csrc(x, signed):
    """nibbles_to_e4m3 / store_e4m3_codes on one nibble x: (x ^ (s * 0x8F)) + s, s = bit 3 (signed)."""
    s = (x >> 3) & 1 if signed else 0
    return (x ^ (s * 0x8F)) + s


def test_wgmma_e4m3_code_bytes():
    """A 4-bit code q becomes the E4M3 byte of q * 2^-9 (subnormal / first binade: exact), for signed
    nibbles (two's complement, -8 included: files may hold it) and unsigned codes 0..15."""
    for x in range(16):
        for signed in (True, False):
            q = x - 16 if signed and x >= 8 else x
            byte = _e4m3_bytes_like_csrc(x, signed)
            value = torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float().item()
            assert value == q * 2.0 ** -9, (x, signed, hex(byte))
    # The largest group sum, 64 * 15 * 8 (unsigned x signed codes), is below 2^13 units of 2^-18: exact in fp32.
    assert 64 * 15 * 8 < 2 ** 13


def _wgmma_act_like_kernel_a(codes, signed):
    """Kernel A's store for the wgmma path, emulated per lane: Lane16Layout words (word v = k 16tid + 8v + i
    in nibble i), then store_e4m3_codes: even nibbles of word v at bytes 32v + 4tid + b, odd at +16."""
    M, K = codes.shape
    packed = numerics.pack_4bit(codes)
    act = torch.zeros(M, K, dtype=torch.long)
    for m in range(M):
        for g in range(K // 64):
            for tid in range(4):
                words = lane_words(packed, m, g, tid, lane16_run_k)
                for v in range(2):
                    for h in range(2):
                        for b in range(4):
                            x = (words[v] >> (8 * b + 4 * h)) & 0xF
                            act[m, 64 * g + 32 * v + 16 * h + 4 * tid + b] = _e4m3_bytes_like_csrc(x, signed)
    return act


def _e4m3_value_codes(byte):
    return torch.where(byte >= 0x80, -(byte & 0x7F), byte)


def test_wgmma_fragments_and_layouts_give_exact_group_products():
    """The wgmma GEMM's operands: weights (A, registers) from the file layout as weight_frags builds them,
    activations (B, shared memory) in kernel A's byte order, k32 MMA v reading bytes 32v .. 32v+31 of the
    group; with the PTX fragment of A (m64k32 8-bit: per warp as m16n8k32: a0/a1 rows gid / gid+8, k 4tid+b;
    a2/a3 k 16+4tid+b) every 16-row x token block gets the exact integer group product. Also: the scale slot
    the promotion reads for D's columns, and backends.cuda's decoding of both back to the spec's layouts."""
    torch.manual_seed(7)
    M, N, K = 16, 32, 128
    for signed in (True, False):
        a = torch.randint(-8, 8, (M, K)) if signed else torch.randint(0, 16, (M, K))
        w = torch.randint(-8, 8, (N, K))
        act = _wgmma_act_like_kernel_a(a, signed)
        w_packed = numerics.pack_4bit(w)
        for g in range(K // 64):
            for w0 in range(0, N, 16):  # one warp's 16 weight rows
                got = torch.zeros(16, M, dtype=torch.long)
                for v in range(2):
                    A = torch.zeros(16, 32, dtype=torch.long)
                    for lane in range(32):
                        gid, tid = lane // 4, lane % 4
                        for hr in range(2):  # rows gid, gid + 8: the lane's 8 bytes, word v = bytes 4v .. 4v+3
                            word = lane_words(w_packed, w0 + gid + 8 * hr, g, tid, lane16_run_k)[v]
                            for b in range(4):
                                lo = _e4m3_bytes_like_csrc((word >> (8 * b)) & 0xF, True)
                                hi = _e4m3_bytes_like_csrc((word >> (8 * b + 4)) & 0xF, True)
                                A[gid + 8 * hr, 4 * tid + b] = _e4m3_value_codes(torch.tensor(lo))
                                A[gid + 8 * hr, 16 + 4 * tid + b] = _e4m3_value_codes(torch.tensor(hi))
                    B = act[:, 64 * g + 32 * v:64 * g + 32 * v + 32].T
                    got += A @ (_e4m3_value_codes(B) if signed else B)
                want = w[w0:w0 + 16, 64 * g:64 * g + 64] @ a[:, 64 * g:64 * g + 64].T
                assert torch.equal(got, want)
        # backends.cuda's decoding gives back the codes (k order) and the file-layout packing.
        codes, packed, _ = cuda_backend._e4m3_act_to_file_layout(act.to(torch.uint8), torch.zeros(2, M), signed)
        assert torch.equal(codes.long(), a) and torch.equal(packed, numerics.pack_4bit(a))
    # Scales: kernel A's slot (e4m3_scale_slot) of token i in a 16-block; the promotion reads the float4 at
    # 16c + 4tid for D's columns (tokens) 16c + 2tid + e (.x, .y) and 16c + 8 + 2tid + e (.z, .w).
    slot = [16 * (i // 16) + 4 * ((i % 16 >> 1) & 3) + 2 * ((i % 16) >> 3) + (i & 1) for i in range(32)]
    assert sorted(slot) == list(range(32))
    for c in range(2):
        for tid in range(4):
            want = [16 * c + 2 * tid, 16 * c + 2 * tid + 1, 16 * c + 8 + 2 * tid, 16 * c + 9 + 2 * tid]
            assert [slot.index(16 * c + 4 * tid + q) for q in range(4)] == want
    sx = torch.arange(2 * 32, dtype=torch.float32).view(2, 32)  # natural order: sx[g, token] = 32g + token
    stored = torch.empty_like(sx)
    stored[:, slot] = sx
    assert torch.equal(cuda_backend._e4m3_act_to_file_layout(torch.zeros(32, 128, dtype=torch.uint8), stored,
                                                             True)[2], sx)


def test_mma_path_selection(monkeypatch):
    assert cuda_backend.default_mma_path((7, 5)) == "s4_m8n8k32"
    for capability in ((8, 0), (8, 6), (8, 7), (8, 9)):
        assert cuda_backend.default_mma_path(capability) == "s4_m16n8k64"
    assert cuda_backend.default_mma_path((9, 0)) == "e4m3_wgmma_sm90a"
    for capability in ((10, 0), (12, 0)):
        assert cuda_backend.default_mma_path(capability) == "s8_m16n8k32"
    monkeypatch.delenv(cuda_backend.PATH_ENV, raising=False)
    monkeypatch.setattr(cuda_build, "device_arch", lambda device=None: "8.6")
    assert cuda_backend.mma_path("cuda:0").name == "s4_m16n8k64"
    for name in cuda_backend.MMA_PATHS:  # all but the sm_90a one legal on sm_86
        monkeypatch.setenv(cuda_backend.PATH_ENV, name)
        if name == "e4m3_wgmma_sm90a":
            with pytest.raises(ValueError, match="e4m3_wgmma_sm90a needs a GPU of sm_90 or newer; cuda:0 is sm_86"):
                cuda_backend.mma_path("cuda:0")
        else:
            assert cuda_backend.mma_path("cuda:0").name == name
    monkeypatch.setattr(cuda_build, "device_arch", lambda device=None: "12.0")
    monkeypatch.setenv(cuda_backend.PATH_ENV, "e4m3_wgmma_sm90a")
    with pytest.raises(ValueError, match="e4m3_wgmma_sm90a runs on sm_90 GPUs only.*cuda:0 is sm_120"):
        cuda_backend.mma_path("cuda:0")
    # sm_90: the wgmma path by default, for the INT4 layers it takes; the others fall back to s8_m16n8k32.
    monkeypatch.delenv(cuda_backend.PATH_ENV, raising=False)
    monkeypatch.setattr(cuda_build, "device_arch", lambda device=None: "9.0")
    for (N, K), name in (((3072, 3072), "e4m3_wgmma_sm90a"), ((200, 3072), "s8_m16n8k32"),
                         ((3072, 320), "s8_m16n8k32"), ((128, 128), "e4m3_wgmma_sm90a")):
        layer = SVDQW4A4Linear(K, N, 0, device="meta")
        assert cuda_backend.layer_mma_path(layer, "cuda:0").name == name, (N, K)
    monkeypatch.setenv(cuda_backend.PATH_ENV, "s8_m16n8k32")  # still selectable on sm_90
    assert cuda_backend.layer_mma_path(SVDQW4A4Linear(3072, 3072, 0, device="meta"), "cuda:0").name == "s8_m16n8k32"
    monkeypatch.setattr(cuda_build, "device_arch", lambda device=None: "7.5")
    monkeypatch.setenv(cuda_backend.PATH_ENV, "s4_m16n8k64")
    with pytest.raises(ValueError, match="s4_m16n8k64 needs a GPU of sm_80 or newer; cuda:0 is sm_75"):
        cuda_backend.mma_path("cuda:0")
    monkeypatch.setenv(cuda_backend.PATH_ENV, "int4")
    with pytest.raises(ValueError, match="not an MMA path; choose one of s8_m16n8k32, s4_m16n8k64, s4_m8n8k32, "
                                         "e4m3_wgmma_sm90a"):
        cuda_backend.mma_path("cuda:0")


def test_import_without_gpu_is_safe():
    import importlib

    importlib.import_module("nunchaku_ext.backends.cuda")
    assert "cuda" in __import__("nunchaku_ext.backends", fromlist=["names"]).names()


def test_arch_parsing_and_refusal():
    assert cuda_build._parse_archs("90") == ("9.0",)
    assert cuda_build._parse_archs("sm_120; 8.6,8.0") == ("8.0", "8.6", "12.0")
    assert cuda_build._parse_archs("all") == cuda_build.SUPPORTED_ARCHS
    assert cuda_build._parse_archs("75") == ("7.5",)
    # sm_90 and sm_120 are built arch-specific (wgmma needs sm_90a, the block-scaled FP4 MMA sm_120a).
    assert cuda_build._gencode_flags(("8.9", "9.0", "12.0")) == ["-gencode=arch=compute_89,code=sm_89",
                                                                 "-gencode=arch=compute_90a,code=sm_90a",
                                                                 "-gencode=arch=compute_120a,code=sm_120a"]
    with pytest.raises(cuda_build.CudaBuildError, match="sm_70.*compute capability 7.5.*Supported: sm_75, sm_80"):
        cuda_build._parse_archs("7.0")


def test_no_gpu_error_is_actionable(monkeypatch):
    monkeypatch.delenv(cuda_build.ARCHS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(cuda_build.CudaBuildError, match="no CUDA GPU is visible"):
        cuda_build.load()
    ok, why = cuda_backend.available()
    assert not ok and "no CUDA GPU" in why


def _hide_toolkits(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(cuda_build, "DEFAULT_CUDA_HOMES", ())
    monkeypatch.setattr(cuda_build, "_wheel_toolkits", lambda: iter(()))


def test_missing_nvcc_error_is_actionable(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    _hide_toolkits(monkeypatch, tmp_path)
    with pytest.raises(cuda_build.CudaBuildError, match=r"no CUDA compiler \(nvcc\) found.*pip install.*nvidia-cuda-nvcc"):
        cuda_build.find_toolkit()


def test_cuda_major_mismatch_error_is_actionable(monkeypatch, tmp_path):
    fake = tmp_path / "cuda-12.8"
    (fake / "bin").mkdir(parents=True)
    (fake / "include").mkdir()
    (fake / "include" / "cuda_runtime.h").write_text("")
    nvcc = fake / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.8, V12.8.93'\n")
    nvcc.chmod(0o755)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    _hide_toolkits(monkeypatch, tmp_path)
    monkeypatch.setenv("CUDA_HOME", str(fake))
    with pytest.raises(cuda_build.CudaBuildError, match=r"CUDA 13.0.*CUDA 12.8.*install the CUDA 13.x toolkit"):
        cuda_build.find_toolkit()


@pytest.mark.skipif(not torch.version.cuda, reason="CPU-only torch")
def test_compile_error_names_the_log(monkeypatch, tmp_path):
    try:
        cuda_build.find_toolkit()
    except cuda_build.CudaBuildError:
        pytest.skip("no CUDA compiler matching torch's CUDA version")
    broken = tmp_path / "csrc"
    shutil.copytree(cuda_build.CSRC_DIR, broken)
    for name in cuda_build.SOURCES:  # fail fast, in both compilers
        (broken / name).write_text("#error deliberately broken\n" + (broken / name).read_text())
    monkeypatch.setattr(cuda_build, "CSRC_DIR", broken)
    monkeypatch.setattr(cuda_build, "_loaded", {})  # a module this process loaded earlier must not answer
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(cuda_build.CudaBuildError, match=r"Full compiler output: (\S+build\.log)") as info:
        cuda_build.load(archs="9.0")
    log_path = re.search(r"Full compiler output: (\S+build\.log)", str(info.value)).group(1)
    assert "deliberately broken" in open(log_path).read()


# ------------------------------------------------------------------------------------------------
# Kernel A


QUANT_CASES = [
    # M, K, rank, unsigned, dtype
    (1, 3072, 32, False, torch.bfloat16),
    (3, 64, 0, False, torch.float16),
    (255, 3072, 7, True, torch.bfloat16),
    (256, 192, 16, False, torch.float16),
    (4096, 3072, 32, False, torch.bfloat16),
    (4608, 3072, 48, True, torch.float16),
    (77, 12288, 32, True, torch.bfloat16),
    (129, 15360, 48, False, torch.bfloat16),
    (33, 320, 130, False, torch.float16),
    (700, 12288, 300, True, torch.bfloat16),  # a base rank plus absorbed LoRAs: many rank passes, K split
]


@requires_cuda
@pytest.mark.parametrize("M,K,rank,unsigned,dtype", QUANT_CASES)
def test_quantize_act_exact(mma_path, M, K, rank, unsigned, dtype):
    layer = make_layer(128, K, rank, unsigned=unsigned, dtype=dtype)
    check_quantize(layer, make_input((M,), K, unsigned=unsigned, dtype=dtype))


# ------------------------------------------------------------------------------------------------
# The whole linear


LINEAR_CASES = [
    # M, N, K, rank, unsigned, dtype
    *[(4096, n, k, 32, False, torch.bfloat16) for n, k in FLUX_NK],
    (4608, 12288, 3072, 32, False, torch.float16),
    (4608, 3072, 12288, 32, True, torch.bfloat16),
    (4608, 3072, 15360, 48, True, torch.float16),
    (4608, 21504, 3072, 16, False, torch.bfloat16),
    (1, 3072, 3072, 32, False, torch.bfloat16),
    (3, 9216, 3072, 0, False, torch.float16),
    (255, 3072, 3072, 7, True, torch.bfloat16),
    (256, 3072, 12288, 48, True, torch.float16),
    (333, 3072, 3072, 16, False, torch.float16),
    # small and odd shapes: N not a multiple of the 128 tile, of 8, or even
    (5, 128, 64, 16, False, torch.bfloat16),
    (130, 200, 192, 7, False, torch.float16),
    (17, 2, 64, 0, True, torch.bfloat16),
    (64, 258, 320, 32, False, torch.bfloat16),
    (1000, 136, 256, 130, True, torch.float16),
    # the wgmma GEMM's partial last row tile (192 rows per tile, N % 64 == 0), and a rank over two 32-rank steps
    (77, 320, 256, 40, False, torch.bfloat16),
    (40, 64, 128, 8, True, torch.float16),
    # the wgmma GEMM's staged low-rank chunks: three per tile over several tiles per CTA; an odd rank
    (4100, 1152, 256, 72, False, torch.bfloat16),
    (300, 192, 256, 37, True, torch.float16),
]


@requires_cuda
@pytest.mark.parametrize("M,N,K,rank,unsigned,dtype", LINEAR_CASES)
def test_linear_matches_reference(mma_path, M, N, K, rank, unsigned, dtype):
    layer = make_layer(N, K, rank, unsigned=unsigned, dtype=dtype, seed=M + N)
    check_linear(layer, make_input((M,), K, unsigned=unsigned, dtype=dtype, seed=K))


@requires_cuda
@pytest.mark.parametrize("bias", [True, False])
def test_linear_no_bias_and_module_dispatch(mma_path, bias):
    layer = make_layer(384, 512, 16, bias=bias)
    x = make_input((2, 100), 512, unsigned=False, dtype=torch.bfloat16)
    check_linear(layer, x, via_module=True)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unsigned", [False, True])
def test_batched_and_noncontiguous_inputs(mma_path, dtype, unsigned):
    K = 320
    layer = make_layer(256, K, 16, unsigned=unsigned, dtype=dtype)
    x3 = make_input((3, 47), K, unsigned=unsigned, dtype=dtype)
    check_quantize(layer, x3)
    check_linear(layer, x3)
    wide = make_input((150,), K + 64, unsigned=unsigned, dtype=dtype)
    row_strided = wide[:, 32:32 + K]  # row stride K+64: read in place (ldx != K)
    assert not row_strided.is_contiguous()
    check_quantize(layer, row_strided)
    check_linear(layer, row_strided)
    transposed = make_input((K,), 90, unsigned=unsigned, dtype=dtype).T  # column stride != 1: copied
    check_linear(layer, transposed)
    every_other = make_input((2, 40), K, unsigned=unsigned, dtype=dtype)[:, ::2]  # batched, strided rows
    check_linear(layer, every_other)


@requires_cuda
def test_quantize_w4a4_layers(mma_path):
    """Layers made by the project's quantizer (SVD, smoothing, unsigned bias compensation)."""
    torch.manual_seed(3)
    for unsigned in (False, True):
        w = torch.randn(320, 512, device="cuda") / 20
        b = torch.randn(320, device="cuda")
        smooth = torch.rand(512, device="cuda") + 0.5
        layer = quantize_w4a4(w, b, rank=32, smooth=smooth, act_unsigned=unsigned)
        layer.backend = "cuda"
        x = make_input((2, 200), 512, unsigned=unsigned, dtype=torch.bfloat16)
        check_linear(layer, x, via_module=True)


@requires_cuda
def test_odd_out_features_are_refused_clearly(ext):
    layer = make_layer(5, 64, 4)
    with pytest.raises(NotImplementedError, match="even number of output features.*'reference' backend"):
        layer(make_input((3,), 64, unsigned=False, dtype=torch.bfloat16))


@requires_cuda
def test_buffer_changes_are_seen(mma_path):
    """The kernels read the layer's buffers themselves: in-place writes and replaced tensors (a LoRA
    absorbed or its strength changed) are seen by the next call."""
    layer = make_layer(256, 256, 16)
    x = make_input((64,), 256, unsigned=False, dtype=torch.bfloat16)
    check_linear(layer, x)
    layer.lora_up.mul_(-2)  # in place, as absorbing a LoRA would
    check_linear(layer, x)
    with torch.no_grad():
        layer.lora_down = torch.cat([layer.lora_down, layer.lora_down[:3] * 0.5])  # rank 16 -> 19
        layer.lora_up = torch.cat([layer.lora_up, layer.lora_up[:, :3]], dim=1)
    check_linear(layer, x)
    layer.wscales.mul_(0.5)
    check_linear(layer, x)


@requires_cuda
def test_replaced_buffers_in_inference_mode(mma_path):
    """ComfyUI samples under inference_mode, and a LoRA strength change replaces lora_up by a new
    tensor of the same shape, which the caching allocator may place at the freed tensor's address."""
    layer = make_layer(256, 256, 16)
    x = make_input((64,), 256, unsigned=False, dtype=torch.bfloat16)
    with torch.inference_mode():
        check_linear(layer, x, via_module=True)
        for scale in (2.0, -0.5):
            up = layer.lora_up * scale
            layer.lora_up = None  # free the old tensor first, so its address is free for the next one
            layer.lora_up = up.clone()
            del up
            check_linear(layer, x, via_module=True)


@requires_cuda
@pytest.mark.parametrize("M,K", [(999, 3072), (333, 12288)])  # sm_90's wgmma path: one pass over K; split K
def test_repeatable(mma_path, M, K):
    layer = make_layer(3072, K, 32)
    x = make_input((M,), K, unsigned=False, dtype=torch.bfloat16)
    y0 = cuda_backend.forward(layer, x)
    for _ in range(3):
        assert torch.equal(cuda_backend.forward(layer, x), y0)


@requires_cuda
@pytest.mark.parametrize("M,K,rank", [(256, 12288, 32), (4608, 15360, 48), (1000, 3072, 96)])
def test_kernel_a_is_deterministic(mma_path, M, K, rank):
    """Kernel A splits K across warps and blocks and adds the partial sums of lora_act in a fixed order
    (no fp32 atomics): the same input gives the same bits on every run."""
    layer = make_layer(128, K, rank)
    x = make_input((M,), K, unsigned=False, dtype=torch.bfloat16)
    first = cuda_backend.quantize_act(layer, x)[3]
    for _ in range(3):
        again = cuda_backend.quantize_act(layer, x)[3]
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@requires_cuda
@pytest.mark.parametrize("unsigned", [False, True])
def test_extreme_group_sums_are_exact(mma_path, unsigned):
    """The largest group sums the kernels accumulate: every weight code -8 times every activation code at
    its maximum c (7 signed, 15 unsigned): |64 * 8 * c| = 3584 / 7680, which the wgmma path's E4M3 tensor
    cores must sum exactly (13 significant bits). Group 1 holds the same codes in half its k (zeros
    elsewhere) and the weight scale -2x group 0's, and the activation scale is 1/16, so every fp32 step is
    exact and y is exactly 0 unless a group sum lost a unit."""
    N, K, M = 192, 128, 64
    c = 15 if unsigned else 7
    layer = make_layer(N, K, 0, unsigned=unsigned)
    layer.qweight.fill_(0x88)
    layer.smooth.fill_(1.0)
    if layer.bias is not None:
        layer.bias.zero_()
    top = c / 16 - (0.171875 if unsigned else 0.0)  # (x + shift) / scale = c with scale 1/16
    x = torch.full((M, K), top, device="cuda", dtype=torch.bfloat16)
    x[:, 96:] = -0.171875 if unsigned else 0.0      # code 0
    codes, scales, _, _ = cuda_backend.quantize_act(layer, x)
    assert (codes[:, :96] == c).all() and (codes[:, 96:] == 0).all() and (scales == 1 / 16).all()
    layer.wscales[0] = 0.01
    layer.wscales[1] = -2 * layer.wscales[0]
    assert (cuda_backend.forward(layer, x) == 0).all()
    layer.wscales[1] = 0  # not vacuous: group 0 alone
    want = (-64 * 8 * c / 16) * layer.wscales[0].float()
    assert torch.allclose(cuda_backend.forward(layer, x).float(), want.expand(M, N), rtol=2 ** -7, atol=0)


@requires_cuda
def test_forced_path_launches_its_kernels(mma_path):
    """The forced path reaches the kernels: the INT4 flavours share a layout, so only the launched
    template instantiation tells them apart."""
    layer = make_layer(256, 256, 16)
    x = make_input((64,), 256, unsigned=False, dtype=torch.bfloat16)
    names = launched_kernels(lambda: cuda_backend.forward(layer, x))
    gemm = [n for n in names if "w4a4_gemm_kernel" in n]
    quant = [n for n in names if "quantize_act_lora_down_kernel" in n]
    if mma_path is cuda_backend.WGMMA_PATH:
        assert not gemm and any(WGMMA_KERNEL in n for n in names), names
    else:
        assert gemm and all(FLAVOURS[mma_path.name] in n for n in gemm), names
    assert quant and all(mma_path.layout in n for n in quant), names
    if mma_path is cuda_backend.WGMMA_PATH:  # a shape it does not take (N % 64) runs the s8 path's two kernels
        layer = make_layer(160, 256, 16)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            check_linear(layer, x)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events()]
        assert not any(WGMMA_KERNEL in n for n in names), names
        assert any("w4a4_gemm_kernel" in n and "MmaS8m16n8k32" in n for n in names), names
        assert any("quantize_act_lora_down_kernel" in n and "Lane16Layout" in n for n in names), names


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unsigned", [False, True])
def test_mma_paths_agree_bitwise(ext, monkeypatch, unsigned, dtype):
    """Every path computes the same exact group sums and adds them in the same fp32 order (sm_90's wgmma
    path included: the shape is one it takes in one pass over K), so at rank 0 all outputs are
    bit-identical. The low-rank branch is fp32 FMAs on the mma.sync paths (bit-identical among them) and
    tf32 hi/lo wgmmas on the wgmma path, which agrees with the spec to the tolerance of check_linear instead;
    so does the wgmma path where it splits K at small M (two halves added at the end: another fp32 order,
    test_linear_matches_reference's K = 12288 cases)."""
    capability = torch.cuda.get_device_capability()
    names = [p.name for p in cuda_backend.MMA_PATHS.values() if capability >= p.min_capability
             and (not p.exact_capability or capability == p.min_capability)]
    if len(names) < 2:
        pytest.skip("one MMA path on this GPU")
    x = make_input((333,), 3072, unsigned=unsigned, dtype=dtype)
    for rank in (0, 32):
        layer = make_layer(3072, 3072, rank, unsigned=unsigned, dtype=dtype)
        outputs = {}
        for name in names:
            monkeypatch.setenv(cuda_backend.PATH_ENV, name)
            outputs[name] = cuda_backend.forward(layer, x)
            if rank:
                check_linear(layer, x)
        exact = [n for n in names if rank == 0 or n != cuda_backend.WGMMA_PATH.name]
        for name in exact[1:]:
            assert torch.equal(outputs[name], outputs[exact[0]]), (name, rank)


# ------------------------------------------------------------------------------------------------
# All-arch build (CPU is enough; needs nvcc). Slow: marked `build`.


def _have_nvcc():
    try:
        cuda_build.find_toolkit()
        return True
    except cuda_build.CudaBuildError:
        return False


@pytest.mark.build
@pytest.mark.skipif(not torch.version.cuda, reason="CPU-only torch")
def test_build_all_archs(tmp_path, monkeypatch):
    if not _have_nvcc():
        pytest.skip("no CUDA compiler matching torch's CUDA version")
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(tmp_path))
    ext = cuda_build.load(archs="all")  # compiles, links and imports
    assert hasattr(ext, "w4a4_gemm") and hasattr(ext, "quantize_act_lora_down")
    so = next((tmp_path / "kernels").glob("*/*.so"))
    # Machine code for every arch in the library (cuobjdump: the toolkit's, or the one triton bundles).
    candidates = [shutil.which("cuobjdump"), os.path.join(str(cuda_build.find_toolkit()[0]), "bin", "cuobjdump")]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    cuobjdump = next((c for c in candidates if c and os.path.exists(c)), None)
    if cuobjdump:
        listing = subprocess.run([cuobjdump, "--list-elf", str(so)], capture_output=True, text=True).stdout
        for arch in cuda_build.SUPPORTED_ARCHS:
            assert f"sm_{arch.replace('.', '')}" in listing, listing
        # Each arch's GEMM, for the path it runs by default, multiplies with the intended instruction
        # (native: an emulated s4 MMA would show as IMMA.*.S8 plus calls into an unpack routine).
        for arch in cuda_build.SUPPORTED_ARCHS:
            sm = "sm_" + arch.replace(".", "") + ("a" if arch in cuda_build.ARCH_SPECIFIC else "")
            path = cuda_backend.default_mma_path(tuple(int(v) for v in arch.split(".")))
            sass = subprocess.run([cuobjdump, "-sass", "-arch", sm, str(so)], capture_output=True, text=True).stdout
            functions = {part.split()[0]: part for part in sass.split("Function : ")[1:]}
            # sm_90's wgmma GEMM (bf16/fp16) multiplies on the FP8 warpgroup MMA; the other archs hold its
            # empty stub. Its fallback, the s8 flavour, is checked below.
            wgmma = [body for name, body in functions.items() if WGMMA_KERNEL in name]
            assert len(wgmma) == 6, (sm, list(functions))  # bf16/fp16 x 64/128-token tiles, 128 split K
            assert all((WGMMA_SASS in body) == (arch == "9.0") for body in wgmma), sm
            if path == cuda_backend.WGMMA_PATH.name:
                path = cuda_backend.WGMMA_FALLBACK
            gemms = {name: body for name, body in functions.items()
                     if "w4a4_gemm_kernel" in name and FLAVOURS[path] in name}
            assert len(gemms) == 4, (sm, list(functions))  # bf16/fp16 x signed/unsigned activations
            for name, body in gemms.items():
                unsigned = re.search(r"w4a4_gemm_kernelI\w+?Lb([01])E", name).group(1) == "1"
                assert EXPECTED_IMMA[path][unsigned] in body, (sm, name)
            # NVFP4 (from sm_80): sm_120's GEMM (bf16/fp16) runs on the block-scaled FP4 MMA (sm_120a).
            capability = tuple(int(v) for v in arch.split("."))
            if capability < cuda_backend.NVFP4_PATH.min_capability:
                continue
            nvfp4 = cuda_backend.nvfp4_mma_path(capability)
            nvfp4_gemms = [body for name, body in functions.items()
                           if "w4a4_gemm_kernel" in name and NVFP4_FLAVOURS[nvfp4.name] in name]
            assert len(nvfp4_gemms) == 2, (sm, list(functions))
            if nvfp4 is cuda_backend.NVFP4_BLOCK_SCALED_PATH:
                assert all("OMMA.SF.16864.F32.E2M1.E2M1.UE4M3.4X" in body for body in nvfp4_gemms), sm
    # Every GEMM flavour and quantize layout is built for every arch, and no kernel spills.
    report = cuda_build.ptxas_report("all")
    kernels = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)a?'.*?(\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads", report, re.S)
    for arch in cuda_build.SUPPORTED_ARCHS:
        names = [name for name, sm, _, _ in kernels if sm == arch.replace(".", "")]
        for flavour in FLAVOURS.values():
            assert sum("w4a4_gemm_kernel" in n and flavour in n for n in names) == 4, (arch, names)
            # the MLP's fc1 variant (tests/test_cuda_mlp.py): bf16/fp16, signed input
            assert sum("w4a4_mlp_fc1_kernel" in n and flavour in n for n in names) == 2, (arch, names)
        # one kernel A serves the three INT4 flavours: bf16/fp16 x signed/unsigned; the wgmma path's (built
        # for every arch, plain CUDA) likewise, and its GEMM (bf16/fp16; an empty stub but on sm_90a)
        assert sum("quantize_act_lora_down_kernel" in n and "Lane16Layout" in n for n in names) == 4, (arch, names)
        assert sum("quantize_act_lora_down_kernel" in n and "Lane16E4M3Layout" in n for n in names) == 4, (arch, names)
        assert sum(WGMMA_KERNEL in n for n in names) == 6, (arch, names)  # x 64/128-token tiles, 128 split K
        for flavour in NVFP4_FLAVOURS.values():  # bf16/fp16; E2M1 codes are signed
            assert sum("w4a4_gemm_kernel" in n and flavour in n for n in names) == 2, (arch, names)
        for layout in ("E2M1Layout", "E2M1NativeLayout"):
            assert sum("quantize_act_lora_down_kernel" in n and layout in n for n in names) == 2, (arch, names)
    # One exception, bounded: the sm_90a GEMM runs its three consumer warpgroups at the 160 registers
    # setmaxnreg can give them and its low-rank staging warps at 32, and ptxas spills a few scalars there
    # (nvcc 13.0: 32-36 bytes in the split-K instances, the consumers' loop-carried ones; 4 bytes in the
    # staging warps of every instance); measured on an H100 that variant is the fastest
    # (csrc/w4a4_sm90a.cu, docs/benchmarks.md).
    def allowed(name, sm, stores, loads):
        return WGMMA_KERNEL in name and sm == "90" and max(int(stores), int(loads)) <= 40
    spilling = [(name, sm) for name, sm, stores, loads in kernels
                if (stores != "0" or loads != "0") and not allowed(name, sm, stores, loads)]
    assert kernels and not spilling, report
