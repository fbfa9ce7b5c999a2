"""The 'cuda' backend's NVFP4 W4A4 path (INT8 tensor cores, csrc/w4a4_nvfp4.cuh) against the spec.

* Layout and decoder (CPU): the packed words, decoded the way the kernel decodes them (a Python PRMT)
  and placed with the PTX m16n8k16 .s8 fragment definitions, give back 2 x the E2M1 values.
* Kernel A (GPU): codes and scales EQUAL numerics.quantize_act_nvfp4(smooth_input(x)) bit for bit
  (same fp32 operations: IEEE division, RNE to E4M3, E2M1 ties to even), evaluated on the GPU;
  lora_act within 2^-16 · |x|·|D|ᵀ (fp32, another summation order).
* The linear (GPU): y within
      |y_cuda - y_ref| <= eps(dtype) · max(|y_cuda|, |y_ref|) + 2^-16 · S,
      S = |Q(xs)·sx| · |Q(W)·sw·alpha·wcscales|ᵀ + |x·Dᵀ| · |U|ᵀ + |bias|
  Both sides compute every 16-group's integer dot product exactly (codes x 2 are integers in
  [-12, 12]), scale it by the same two fp32 scales and sum in fp32, multiply by alpha = wtscale / 4
  and by wcscales[n] once, in the spec's order; only the order of fp32 additions differs (a few ulps of S; 2^-16 leaves ~128), then each
  rounds once to the output dtype (eps·|y|).
* Outputs are NaN-poisoned (codes: every nibble 8 = E2M1 -0, which the quantizer never writes).
"""
import math

import pytest
import torch

from nunchaku_ext import cuda_build, numerics
from nunchaku_ext.backends import cuda as cuda_backend
from nunchaku_ext.backends import reference
from nunchaku_ext.layers import SVDQW4A4Linear
from nunchaku_ext.quantize import quantize_w4a4

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FLUX_NK = [(9216, 3072), (3072, 3072), (12288, 3072), (3072, 12288), (21504, 3072), (3072, 15360)]


@pytest.fixture(scope="module")
def ext():
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference's fp32 matmuls stay fp32
    return cuda_build.load()


# ------------------------------------------------------------------------------------------------
# CPU: decoder and layouts


def _byte_perm(a, b, sel):
    """CUDA __byte_perm (PRMT, default mode): result byte i = byte (sel >> 4i) & 7 of the 8 bytes (b:a)."""
    pool = (b << 32) | a
    return sum(((pool >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


def _e2m1x4_to_s8x4(sel):
    """csrc/w4a4_nvfp4.cuh e2m1x4_to_s8x4, step for step."""
    idx = sel & 0x7777
    pos = _byte_perm(0x03020100, 0x0C080604, idx)
    neg = _byte_perm(0xFDFEFF00, 0xF4F8FAFC, idx)
    return _byte_perm(neg, pos, 0x7654 - ((sel >> 1) & 0x4444))


def _s8(byte):
    return byte - 256 if byte >= 128 else byte


def test_e2m1_decoder_gives_twice_the_value():
    codes = torch.arange(16, dtype=torch.uint8)
    want = (2 * numerics.e2m1_to_float(codes)).long().tolist()
    for c0 in range(16):
        sel = c0 | (((c0 + 5) % 16) << 4) | (((c0 + 9) % 16) << 8) | (((c0 * 7) % 16) << 12)
        out = _e2m1x4_to_s8x4(sel | 0xABCD0000)  # bits above 15 must not matter
        got = [_s8((out >> (8 * b)) & 0xFF) for b in range(4)]
        assert got == [want[(sel >> (4 * b)) & 0xF] for b in range(4)], hex(sel)


def test_e2m1_weight_layout_matches_ptx_mapping():
    torch.manual_seed(0)
    N, K = 24, 80  # K a multiple of 16, not of 64: zero-padded to 128
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    wp = cuda_backend.pack_weight_fragments(numerics.pack_4bit(codes), 32, "e2m1")
    assert wp.shape == (2, 2, 32, 4)
    seen = torch.full((32, 128), 99)
    for p in range(2):
        for g in range(2):
            for lane in range(32):
                gid, tid = lane // 4, lane % 4
                for t in range(2):
                    for v in range(2):
                        word = int(wp[p, g, lane, 2 * t + v]) & 0xFFFFFFFF
                        for half in range(2):  # the B register (col gid, k tid*4 + b) of 16-group 2v + half
                            reg = _e2m1x4_to_s8x4(word >> (16 * half))
                            for b in range(4):
                                seen[16 * p + 8 * t + gid, 64 * g + 16 * (2 * v + half) + 4 * tid + b] = _s8((reg >> (8 * b)) & 0xFF)
    want = torch.zeros(32, 128, dtype=torch.long)
    want[:N, :K] = (2 * numerics.e2m1_to_float(codes)).long()
    assert torch.equal(seen, want)


def test_e2m1_act_layout_roundtrip():
    """Kernel A's packing (word j, nibble b of the low / high 16 bits = rows gid / gid+8 at
    k = 16j + 4tid + b), written here from that description, is what unpack_act_fragments reads, and
    what the m16n8k16 A registers of 16-group j hold."""
    torch.manual_seed(1)
    MT, G = 2, 3
    codes = torch.randint(0, 16, (MT * 16, G * 64), dtype=torch.uint8)
    words = torch.zeros(MT, G, 32, 4, dtype=torch.int64)
    for mt in range(MT):
        for g in range(G):
            for lane in range(32):
                gid, tid = lane // 4, lane % 4
                for j in range(4):
                    w = 0
                    for h in range(2):
                        for b in range(4):
                            w |= int(codes[16 * mt + gid + 8 * h, 64 * g + 16 * j + 4 * tid + b]) << (4 * b + 16 * h)
                    words[mt, g, lane, j] = w
                    for h in range(2):  # A register a_h: row gid + 8h, k tid*4 + b of group j
                        reg = _e2m1x4_to_s8x4(w >> (16 * h))
                        for b in range(4):
                            value = 2 * numerics.e2m1_to_float(codes[16 * mt + gid + 8 * h, 64 * g + 16 * j + 4 * tid + b])
                            assert _s8((reg >> (8 * b)) & 0xFF) == int(value)
    act = (words - (words >= 2 ** 31).long() * 2 ** 32).to(torch.int32)
    assert torch.equal(cuda_backend.unpack_act_fragments(act, MT * 16, False, "e2m1"), codes)


# ------------------------------------------------------------------------------------------------
# GPU


def make_layer(N, K, rank, *, dtype=torch.bfloat16, bias=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    layer = SVDQW4A4Linear(K, N, rank, bias=bias, precision="nvfp4", dtype=dtype, device="cuda")
    layer.qweight.copy_(numerics.pack_4bit(torch.randint(0, 16, (N, K), generator=g, device="cuda")))
    layer.wscales.copy_((torch.rand(K // 16, N, generator=g, device="cuda") * 8 + 0.05).to(torch.float8_e4m3fn))
    layer.wtscale.fill_(0.0037)
    layer.wcscales.copy_(torch.rand(N, generator=g, device="cuda") + 0.5)
    layer.smooth.copy_((torch.rand(K, generator=g, device="cuda") * 1.5 + 0.25).to(dtype))
    layer.lora_down.copy_((torch.randn(rank, K, generator=g, device="cuda") / math.sqrt(K)).to(dtype))
    layer.lora_up.copy_((torch.randn(N, rank, generator=g, device="cuda") * 0.1).to(dtype))
    if layer.bias is not None:
        layer.bias.copy_(torch.randn(N, generator=g, device="cuda").to(dtype))
    layer.backend = "cuda"
    return layer


def make_input(shape, K, dtype, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*shape, K, generator=g, device="cuda") * torch.exp(torch.randn(K, generator=g, device="cuda"))
    rows = x.view(-1, K)
    rows[::5, :16] = 0                 # all-zero groups: scale 0, codes 0
    if rows.shape[0] > 3:
        rows[1] = 0                    # an all-zero row
        rows[2] *= 2e-4                # tiny groups: subnormal E4M3 scales, or scales that round to 0
        rows[3] *= 400                 # large groups: absmax / 6 above 448, the scale clamps (codes saturate)
    return x.clamp(-6e4, 6e4).to(dtype)


def check_quantize(layer, x):
    K = layer.in_features
    x2 = x.reshape(-1, K)
    ref_codes, ref_scales = numerics.quantize_act_nvfp4(numerics.smooth_input(x2, layer.smooth, False))
    codes, scales, lora_act, (act_raw, scales_raw, lora_raw) = cuda_backend.quantize_act(layer, x, poison=True)
    M = x2.shape[0]
    assert torch.equal(scales, ref_scales.float()), f"scales differ at {(scales != ref_scales.float()).nonzero()[:5].tolist()}"
    assert torch.equal(codes, ref_codes), f"codes differ at {(codes != ref_codes).nonzero()[:5].tolist()}"
    # Padding (rows M .. M_pad, columns K .. K64) must be written too, as zeros: the GEMM reads it.
    assert not scales_raw.isnan().any() and not lora_raw.isnan().any()
    all_codes = cuda_backend.unpack_act_fragments(act_raw, act_raw.shape[0] * 16, False, "e2m1")
    assert (all_codes[M:] == 0).all() and (all_codes[:, K:] == 0).all()
    assert (scales_raw[:, M:] == 0).all() and (scales_raw[K // 16:] == 0).all() and (lora_raw[M:] == 0).all()
    if layer.rank:
        ref = x2.double() @ layer.lora_down.double().T
        bound = x2.double().abs() @ layer.lora_down.double().abs().T
        assert ((lora_act.double() - ref).abs() <= 2 ** -16 * bound + 1e-30).all()


def check_linear(layer, x, *, via_module=False):
    N, K = layer.out_features, layer.in_features
    y_ref = reference.w4a4_linear(layer, x)
    if via_module:
        y = layer(x)
    else:
        out = torch.full((*x.shape[:-1], N), float("nan"), dtype=x.dtype, device=x.device)
        y = cuda_backend.forward(layer, x, out=out)
        assert y.data_ptr() == out.data_ptr()
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    assert not y.isnan().any(), "unwritten (NaN-poisoned) output elements"
    x2 = x.reshape(-1, K)
    codes, sx = numerics.quantize_act_nvfp4(numerics.smooth_input(x2, layer.smooth, False))
    deq_x = numerics.e2m1_to_float(codes).abs() * numerics.expand_groups(sx.float(), 16)
    S = deq_x @ layer.dequantized_residual().abs().T  # dequantized_residual includes wtscale, wcscales
    if layer.rank:
        S += (x2.float() @ layer.lora_down.float().T).abs() @ layer.lora_up.float().abs().T
    if layer.bias is not None:
        S += layer.bias.float().abs()
    S = S.reshape(y.shape)
    yf, rf = y.float(), y_ref.float()
    tol = torch.finfo(x.dtype).eps * torch.maximum(yf.abs(), rf.abs()) + 2 ** -16 * S
    err = (yf - rf).abs()
    assert (err <= tol).all(), f"max err/tol {(err / tol.clamp_min(1e-30)).max().item():.3g}"


QUANT_CASES = [
    # M, K, rank, dtype
    (1, 3072, 32, torch.bfloat16),
    (3, 80, 0, torch.float16),          # K a multiple of 16, not 64
    (255, 3072, 7, torch.bfloat16),
    (256, 208, 16, torch.float16),
    (4096, 3072, 32, torch.bfloat16),
    (4608, 3072, 48, torch.float16),
    (77, 12288, 32, torch.bfloat16),
    (129, 15360, 16, torch.bfloat16),
    (33, 560, 130, torch.float16),
]


@requires_cuda
@pytest.mark.parametrize("M,K,rank,dtype", QUANT_CASES)
def test_quantize_act_exact(ext, M, K, rank, dtype):
    layer = make_layer(128, K, rank, dtype=dtype)
    check_quantize(layer, make_input((M,), K, dtype, seed=M))


LINEAR_CASES = [
    # M, N, K, rank, dtype
    *[(4096, n, k, 32, torch.bfloat16) for n, k in FLUX_NK],
    (4608, 12288, 3072, 32, torch.float16),
    (4608, 3072, 15360, 16, torch.bfloat16),
    (1, 3072, 3072, 32, torch.bfloat16),
    (3, 9216, 3072, 0, torch.float16),
    (255, 3072, 12288, 7, torch.bfloat16),
    (5, 128, 64, 16, torch.bfloat16),
    (130, 200, 208, 7, torch.float16),   # K % 64 != 0
    (17, 3, 16, 0, torch.bfloat16),      # one 16-group
    (64, 257, 336, 32, torch.bfloat16),
    (1000, 136, 256, 130, torch.float16),
]


@requires_cuda
@pytest.mark.parametrize("M,N,K,rank,dtype", LINEAR_CASES)
def test_linear_matches_reference(ext, M, N, K, rank, dtype):
    layer = make_layer(N, K, rank, dtype=dtype, seed=M + N)
    check_linear(layer, make_input((M,), K, dtype, seed=K))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_batched_noncontiguous_and_dispatch(ext, dtype):
    K = 320
    layer = make_layer(256, K, 16, dtype=dtype, bias=False)
    x3 = make_input((3, 47), K, dtype)
    check_quantize(layer, x3)
    check_linear(layer, x3, via_module=True)
    row_strided = make_input((150,), K + 64, dtype)[:, 32:32 + K]
    check_quantize(layer, row_strided)
    check_linear(layer, row_strided)
    check_linear(layer, make_input((K,), 90, dtype).T)
    check_linear(layer, make_input((2, 40), K, dtype)[:, ::2])


@requires_cuda
def test_quantized_layers_and_prepared_copy(ext):
    """Layers made by the project's quantizer (SVD, smoothing, NVFP4 weights with alpha), then an
    in-place wtscale / wcscales change (re-prepares them) and a LoRA-style rank growth."""
    torch.manual_seed(3)
    w = torch.randn(320, 512, device="cuda") / 20
    layer = quantize_w4a4(w, torch.randn(320, device="cuda"), rank=32, smooth=torch.rand(512, device="cuda") + 0.5,
                          precision="nvfp4")
    layer.backend = "cuda"
    x = make_input((2, 100), 512, torch.bfloat16)
    check_linear(layer, x, via_module=True)
    layer.wtscale.mul_(3)
    check_linear(layer, x)
    layer.wcscales.copy_(torch.linspace(0.5, 2, 320, device="cuda"))
    check_linear(layer, x)
    with torch.no_grad():
        layer.lora_down = torch.cat([layer.lora_down, layer.lora_down[:3] * 0.5])
        layer.lora_up = torch.cat([layer.lora_up, layer.lora_up[:, :3]], dim=1)
    check_linear(layer, x)


@requires_cuda
def test_repeatable(ext):
    layer = make_layer(3072, 3072, 32)
    x = make_input((999,), 3072, torch.bfloat16)
    y0 = cuda_backend.forward(layer, x)
    for _ in range(3):
        assert torch.equal(cuda_backend.forward(layer, x), y0)
