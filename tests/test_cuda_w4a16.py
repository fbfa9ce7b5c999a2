"""The 'cuda' backend's W4A16 linear (modulation layers) against the reference backend (the spec).

* Layout (CPU): the repacked words, read the way csrc/w4a16_gemv.cu reads them and multiplied with
  the PTX m16n8k16 fragment definitions, give every 16 x 8 tile's group dot products exactly.
* The linear (GPU): y within
      |y_cuda - y_ref| <= eps(dtype) · max(|y_cuda|, |y_ref|) + 2^-16 · S,
      S = |x| · (code·|scale| + |zero|)ᵀ + |bias|   (the sum of absolute terms).
  Why: the reference multiplies x by the fp32 dequantized weight (code·scale + zero, one rounding
  per weight); the kernel sums x·code and x per 64-group on the tensor cores (products exact, fp32
  sums) and applies scale and zero per group in fp32. Same terms, other rounding order: a few fp32
  ulps of S, 2^-16 leaves ~128 of headroom; then each side rounds once to bf16/fp16 (one output
  ulp). A wrong group, scale, zero or layout slip moves y by a large fraction of S.
* Outputs are NaN-poisoned before each run, so an unwritten element fails.
"""
import pytest
import torch

from nunchaku_ext import cuda_build, numerics
from nunchaku_ext.backends import cuda as cuda_backend
from nunchaku_ext.backends import cuda_w4a16, reference
from nunchaku_ext.layers import W4A16Linear
from nunchaku_ext.lora import AdapterSet, W4A16LinearLoRA
from test_cuda_w4a4 import ext, requires_cuda  # noqa: F401 (fixture)


def make_layer(N, K, *, dtype=torch.bfloat16, bias=True, device="cuda", seed=0, cls=W4A16Linear):
    g = torch.Generator(device=device).manual_seed(seed)
    layer = cls(K, N, bias=bias, dtype=dtype, device=device)
    layer.qweight.copy_(numerics.pack_4bit(torch.randint(0, 16, (N, K), generator=g, device=device)))
    layer.wscales.copy_((torch.rand(K // 64, N, generator=g, device=device) * 0.01 + 1e-4).to(dtype))
    layer.wzeros.copy_((torch.randn(K // 64, N, generator=g, device=device) * 0.05).to(dtype))
    if layer.bias is not None:
        layer.bias.copy_(torch.randn(N, generator=g, device=device).to(dtype))
    layer.backend = "cuda"
    return layer


def make_input(shape, K, dtype, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*shape, K, generator=g, device="cuda") * torch.exp(torch.randn(K, generator=g, device="cuda"))
    return x.to(dtype)


def check_linear(layer, x, *, via_module=False):
    N, K = layer.out_features, layer.in_features
    y_ref = reference.w4a16_linear(layer, x)
    if via_module:
        y = layer(x)
    else:
        out = torch.full((*x.shape[:-1], N), float("nan"), dtype=x.dtype, device=x.device)
        y = cuda_backend.w4a16_linear(layer, x, out=out)
        assert y.data_ptr() == out.data_ptr()
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    assert not y.isnan().any(), "unwritten (NaN-poisoned) output elements"
    codes = numerics.unpack_4bit(layer.qweight, signed=False).float()
    w_abs = codes * numerics.expand_groups(layer.wscales.float().abs().T, 64) \
        + numerics.expand_groups(layer.wzeros.float().abs().T, 64)
    S = x.reshape(-1, K).float().abs() @ w_abs.T
    if layer.bias is not None:
        S += layer.bias.float().abs()
    S = S.reshape(y.shape)
    yf, rf = y.float(), y_ref.float()
    tol = torch.finfo(x.dtype).eps * torch.maximum(yf.abs(), rf.abs()) + 2 ** -16 * S
    err = (yf - rf).abs()
    assert (err <= tol).all(), f"max err/tol {(err / tol.clamp_min(1e-30)).max().item():.3g}"
    return y


# ------------------------------------------------------------------------------------------------
# Layout (no GPU): the packed words against the PTX m16n8k16 fragment definitions


def test_weight_layout_matches_ptx_mapping():
    torch.manual_seed(0)
    N, K, M = 40, 128, 8
    codes = torch.randint(0, 16, (N, K))
    x = torch.randint(-9, 10, (M, K))
    n_pad = 64
    wp = cuda_w4a16.pack_weight(numerics.pack_4bit(codes), n_pad)
    assert wp.shape == (n_pad // 16, K // 64, 32, 4)
    padded = torch.cat([codes, codes.new_zeros(n_pad - N, K)])
    for T in range(n_pad // 16):
        for g in range(K // 64):
            C = torch.zeros(16, 8, dtype=torch.int64)
            for j in range(4):  # k16 step j: build A (16x16) and B (16x8) as the MMA sees them
                A = torch.full((16, 16), -1, dtype=torch.int64)
                B = torch.full((16, 8), -1, dtype=torch.int64)
                for lane in range(32):
                    gid, tid = lane // 4, lane % 4
                    word = int(wp[T, g, lane, j]) & 0xFFFFFFFF
                    # the kernel's B registers: x[m = gid][64g + 16tid + e], words 2j (e = 4j, 4j+1), 2j+1 (4j+2, 4j+3)
                    x_lane = x[gid, 64 * g + 16 * tid: 64 * g + 16 * tid + 16]
                    for q in range(2):
                        B[2 * tid + q, gid] = x_lane[4 * j + q]       # b reg0: k 2tid+q, col gid
                        B[8 + 2 * tid + q, gid] = x_lane[4 * j + 2 + q]  # b reg1: k 8+2tid+q
                        for r in range(4):  # A reg r: rows gid (+8 if r odd), k 2tid+q (+8 if r >= 2)
                            A[gid + 8 * (r % 2), 2 * tid + q + 8 * (r // 2)] = (word >> (4 * r + 16 * q)) & 0xF
                assert (A >= 0).all()
                C += A @ B
            ref = padded[16 * T:16 * T + 16, 64 * g:64 * g + 64] @ x[:, 64 * g:64 * g + 64].T
            assert torch.equal(C, ref), (T, g)


def test_scale_zero_layout():
    G, N = 3, 20
    s = torch.randn(G, N).to(torch.bfloat16)
    z = torch.randn(G, N).to(torch.bfloat16)
    packed = cuda_w4a16.pack_scale_zero(s, z, 32)
    assert packed.shape == (2, G, 8, 2) and packed.dtype == torch.int32
    halves = packed.view(torch.int16).view(2, G, 8, 2, 2)  # [..., h, (scale, zero)]
    for n in range(32):
        T, gid, h = n // 16, n % 8, (n % 16) // 8
        for g in range(G):
            got = halves[T, g, gid, h].view(torch.bfloat16)
            want = torch.stack((s[g, n], z[g, n])) if n < N else torch.zeros(2, dtype=torch.bfloat16)
            assert torch.equal(got, want), (n, g)


# ------------------------------------------------------------------------------------------------
# The linear on the GPU

MOD_CASES = [
    # M, N, K, layer dtype, input dtype
    *[(m, 18432, 3072, torch.bfloat16, torch.bfloat16) for m in (1, 2, 3, 4, 8)],
    *[(m, 9216, 3072, torch.float16, torch.float16) for m in (1, 5, 8)],
    (9, 18432, 3072, torch.bfloat16, torch.bfloat16),      # past one batch chunk of 8
    (17, 9216, 3072, torch.float16, torch.float16),
    (255, 3072, 3072, torch.bfloat16, torch.bfloat16),      # "large M": the tiled path
    (1000, 200, 192, torch.float16, torch.float16),
    (4096, 3072, 3072, torch.bfloat16, torch.bfloat16),
    (2, 3, 64, torch.bfloat16, torch.bfloat16),             # small and odd N
    (7, 40, 128, torch.float16, torch.float16),
    (3, 257, 320, torch.bfloat16, torch.bfloat16),
    (4, 100, 576, torch.float16, torch.bfloat16),           # scales fp16, input bf16
    (4, 1000, 3072, torch.bfloat16, torch.float16),         # scales bf16, input fp16
]


@requires_cuda
@pytest.mark.parametrize("M,N,K,layer_dtype,dtype", MOD_CASES)
def test_linear_matches_reference(ext, M, N, K, layer_dtype, dtype):
    layer = make_layer(N, K, dtype=layer_dtype, seed=M + N)
    check_linear(layer, make_input((M,), K, dtype, seed=K))


@requires_cuda
@pytest.mark.parametrize("bias", [True, False])
def test_module_dispatch_batched_and_noncontiguous(ext, bias):
    K = 3072
    layer = make_layer(9216, K, bias=bias)
    check_linear(layer, make_input((2, 1), K, torch.bfloat16), via_module=True)  # modulation: [B, 1, K]
    wide = make_input((6,), K + 64, torch.bfloat16)
    check_linear(layer, wide[:, 8:8 + K])        # row stride K+64, read in place
    check_linear(layer, wide[:, 4:4 + K])        # 8-byte offset: copied (16-byte loads)
    check_linear(layer, make_input((K,), 5, torch.bfloat16).T)  # column stride != 1
    check_linear(layer, make_input((3, 4), K, torch.bfloat16)[:, ::2])


@requires_cuda
def test_lora_subclass_and_prepared_copy(ext):
    """nunchaku_ext.lora's W4A16LinearLoRA adds its branch after the kernel; a bias patch and
    in-place weight changes re-prepare the kernel's copy."""
    N, K = 3072, 3072
    layer = make_layer(N, K, cls=W4A16LinearLoRA)
    x = make_input((3,), K, torch.bfloat16)
    check_linear(layer, x, via_module=True)
    g = torch.Generator(device="cuda").manual_seed(5)
    down = (torch.randn(8, K, generator=g, device="cuda") / 50).to(torch.bfloat16)
    up = (torch.randn(N, 8, generator=g, device="cuda") / 50).to(torch.bfloat16)
    layer.set_adapters(AdapterSet(down, up, torch.randn(N, generator=g, device="cuda").to(torch.bfloat16)))
    y = layer(x)
    layer.backend = "reference"
    y_ref = layer(x)
    layer.backend = "cuda"
    # Both add the same bf16 branch to their base output (checked against each other here, bias patch
    # included) and round once more: the difference grows by at most one output ulp.
    base = check_linear(layer, x)
    base_gap = (base.float() - reference.w4a16_linear(layer, x).float()).abs()
    eps = torch.finfo(torch.bfloat16).eps
    assert ((y.float() - y_ref.float()).abs() <= base_gap + eps * torch.maximum(y.float().abs(), y_ref.float().abs())).all()
    layer.wscales.mul_(0.5)
    layer.qweight.bitwise_xor_(0x11)
    check_linear(layer, x)


@requires_cuda
def test_repeatable(ext):
    layer = make_layer(18432, 3072)
    x = make_input((4,), 3072, torch.bfloat16)
    y0 = cuda_backend.w4a16_linear(layer, x)
    for _ in range(3):
        assert torch.equal(cuda_backend.w4a16_linear(layer, x), y0)


def test_turing_runs_the_reference_with_a_warning(monkeypatch, caplog):
    """sm_75 has no m16n8k16 16-bit MMA: the layer must still work (reference backend), and say so."""
    monkeypatch.setattr(cuda_build, "device_arch", lambda device=None: "7.5")
    monkeypatch.setattr(cuda_w4a16, "_warned_turing", [])
    layer = make_layer(40, 128, device="cpu")
    x = torch.randn(3, 128).to(torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # CPU tensors stand in for sm_75 ones
    with caplog.at_level("WARNING"):
        y = cuda_w4a16.forward(None, layer, x)
    assert torch.equal(y, reference.w4a16_linear(layer, x))
    assert "sm_75" in caplog.text and "reference backend" in caplog.text
