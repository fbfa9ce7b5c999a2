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
    else:  # per-channel outliers, so groups see very different ranges
        x = torch.randn(*shape, K, generator=g, device=device)
        x = x * torch.exp(torch.randn(K, generator=g, device=device))
    x = x.to(dtype)
    rows = x.view(-1, K)
    rows[:: 5, :64] = 0  # all-zero groups: scale 0, codes 0
    if rows.shape[0] > 2:
        rows[1] = 0  # an all-zero row
    return x


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
    assert (cuda_backend.unpack_act_fragments(act_raw, act_raw.shape[0] * 16, True)[M:] == 0).all()
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
    codes, sx = numerics.quantize_act_int4(xs, layer.act_unsigned)
    deq_x = codes.float().abs() * numerics.expand_groups(sx, 64)
    S = deq_x @ layer.dequantized_residual().abs().T
    if layer.rank:
        S += (x2.float() @ layer.lora_down.float().T).abs() @ layer.lora_up.float().abs().T
    if layer.bias is not None:
        S += layer.bias.float().abs()
    S = S.reshape(y.shape)
    yf, rf = y.float(), y_ref.float()
    eps = torch.finfo(x.dtype).eps
    tol = eps * torch.maximum(yf.abs(), rf.abs()) + 2 ** -16 * S
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
# Layout tests: no GPU needed. They prove the packers agree with the PTX fragment definitions that
# the GEMM's mma.sync relies on (csrc/w4a4_int8.cu, "The fragment layout").


def _pack_act_fragments(codes):
    """Test-only inverse of unpack_act_fragments (codes int [M_pad, K] -> int32 [M_pad/16, K/64, 32, 4])."""
    Mp, K = codes.shape
    nib = (codes.to(torch.int16) & 0xF).to(torch.uint8).view(Mp // 16, 2, 8, K // 64, 4, 4, 4)  # mt,rh,gid,g,j,tid,b
    nib = nib.permute(0, 3, 2, 5, 4, 6, 1)  # mt, g, gid, tid, j, b, rh
    return (nib[..., 0] | nib[..., 1] << 4).contiguous().view(torch.int32).reshape(Mp // 16, K // 64, 32, 4)


def _s8_bytes(word, signed):
    """One packed word -> (low register bytes, high register bytes), as the kernel unpacks it."""
    lo = [(word >> (8 * b)) & 0xF for b in range(4)]
    hi = [(word >> (8 * b + 4)) & 0xF for b in range(4)]
    if signed:
        lo = [v - 16 if v >= 8 else v for v in lo]
        hi = [v - 16 if v >= 8 else v for v in hi]
    return lo, hi


def test_fragment_layouts_match_ptx_mapping():
    torch.manual_seed(0)
    M, N, K = 32, 48, 128
    a = torch.randint(-8, 8, (M, K))
    w = torch.randint(-8, 8, (N, K))
    act = _pack_act_fragments(a)
    assert torch.equal(cuda_backend.unpack_act_fragments(act, M, unsigned=False), a.to(torch.int8))
    wp = cuda_backend.pack_weight_fragments(numerics.pack_4bit(w), n_pad=64)
    assert wp.shape == (4, 2, 32, 4)
    a_seen = torch.full((M, K), 99)
    w_seen = torch.full((64, K), 99)
    for g in range(K // 64):
        for lane in range(32):
            gid, tid = lane // 4, lane % 4
            for mt in range(M // 16):
                words = [int(v) & 0xFFFFFFFF for v in act[mt, g, lane]]
                regs = []  # a[v][r] as the kernel builds them: (x -> a0,a1), (y -> a2,a3), (z, w) for MMA 1
                for wd in words:
                    regs.extend(_s8_bytes(wd, True))
                for v in range(2):
                    for r in range(4):  # PTX m16n8k32 .s8 A: row gid (+8 for a1, a3), k tid*4+b (+16 for a2, a3)
                        for b in range(4):
                            row = mt * 16 + gid + 8 * (r % 2)
                            k = g * 64 + 32 * v + 16 * (r // 2) + tid * 4 + b
                            a_seen[row, k] = regs[4 * v + r][b]
            for p in range(wp.shape[0]):
                words = [int(v) & 0xFFFFFFFF for v in wp[p, g, lane]]
                for t in range(2):
                    for v in range(2):
                        b0, b1 = _s8_bytes(words[2 * t + v], True)
                        for r, reg in enumerate((b0, b1)):  # PTX B: col gid, k tid*4+b (+16 for b1)
                            for b in range(4):
                                w_seen[16 * p + 8 * t + gid, g * 64 + 32 * v + 16 * r + tid * 4 + b] = reg[b]
    assert torch.equal(a_seen, a)
    assert torch.equal(w_seen[:N], w) and (w_seen[N:] == 0).all()


def test_import_without_gpu_is_safe():
    import importlib

    importlib.import_module("nunchaku_ext.backends.cuda")
    assert "cuda" in __import__("nunchaku_ext.backends", fromlist=["names"]).names()


def test_arch_parsing_and_refusal():
    assert cuda_build._parse_archs("90") == ("9.0",)
    assert cuda_build._parse_archs("sm_120; 8.6,8.0") == ("8.0", "8.6", "12.0")
    assert cuda_build._parse_archs("all") == cuda_build.SUPPORTED_ARCHS
    with pytest.raises(cuda_build.CudaBuildError, match="sm_75.*Supported: sm_80"):
        cuda_build._parse_archs("7.5")


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
]


@requires_cuda
@pytest.mark.parametrize("M,K,rank,unsigned,dtype", QUANT_CASES)
def test_quantize_act_exact(ext, M, K, rank, unsigned, dtype):
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
    (17, 3, 64, 0, True, torch.bfloat16),
    (64, 257, 320, 32, False, torch.bfloat16),
    (1000, 136, 256, 130, True, torch.float16),
]


@requires_cuda
@pytest.mark.parametrize("M,N,K,rank,unsigned,dtype", LINEAR_CASES)
def test_linear_matches_reference(ext, M, N, K, rank, unsigned, dtype):
    layer = make_layer(N, K, rank, unsigned=unsigned, dtype=dtype, seed=M + N)
    check_linear(layer, make_input((M,), K, unsigned=unsigned, dtype=dtype, seed=K))


@requires_cuda
@pytest.mark.parametrize("bias", [True, False])
def test_linear_no_bias_and_module_dispatch(ext, bias):
    layer = make_layer(384, 512, 16, bias=bias)
    x = make_input((2, 100), 512, unsigned=False, dtype=torch.bfloat16)
    check_linear(layer, x, via_module=True)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unsigned", [False, True])
def test_batched_and_noncontiguous_inputs(ext, dtype, unsigned):
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
def test_quantize_w4a4_layers(ext):
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
def test_prepared_copy_follows_buffer_changes(ext):
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
def test_repeatable(ext):
    layer = make_layer(3072, 3072, 32)
    x = make_input((999,), 3072, unsigned=False, dtype=torch.bfloat16)
    y0 = cuda_backend.forward(layer, x)
    for _ in range(3):
        assert torch.equal(cuda_backend.forward(layer, x), y0)


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
    # No kernel spills on any arch.
    report = cuda_build.ptxas_report("all")
    spill_lines = [l for l in report.splitlines() if "spill" in l]
    assert len(spill_lines) == 8 * len(cuda_build.SUPPORTED_ARCHS), report
    assert all("0 bytes spill stores, 0 bytes spill loads" in l for l in spill_lines), report
