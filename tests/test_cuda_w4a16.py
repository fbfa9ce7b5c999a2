"""The 'cuda' backend's W4A16 linear (modulation layers) against the reference backend (the spec).

* The linear (GPU): y within
      |y_cuda - y_ref| <= eps(dtype) · max(|y_cuda|, |y_ref|) + 2^-16 · S,
      S = |x| · (code·|scale| + |zero|)ᵀ + |bias|   (the sum of absolute terms).
  Why: the reference multiplies x by the fp32 dequantized weight (code·scale + zero, one rounding
  per weight); the kernel sums x·code and x per 64-group on the tensor cores (products exact, fp32
  sums) and applies scale and zero per group in fp32. Same terms, other rounding order: a few fp32
  ulps of S, 2^-16 leaves ~128 of headroom; then each side rounds once to bf16/fp16 (one output
  ulp). A wrong group, scale, zero, column mapping or N-tail slip moves y by a large fraction of S.
* Outputs are NaN-poisoned before each run, so an unwritten element fails.
* The kernel reads the layer's buffers in place (file layout): no copy, no backend state, no memory
  beyond the output; buffers it cannot read in place (another device, a strided view, a misaligned
  qweight, a bias of another dtype) are copied for the one call.
"""
import pytest
import torch

from nunchaku_ext import cuda_build, numerics
from nunchaku_ext.backends import cuda as cuda_backend
from nunchaku_ext.backends import cuda_w4a16, reference
from nunchaku_ext.layers import W4A16Linear
from nunchaku_ext.lora import AdapterSet, W4A16LinearLoRA
from test_cuda_w4a4 import ext, requires_cuda  # noqa: F401 (fixture)

bf16, fp16 = torch.bfloat16, torch.float16


def make_layer(N, K, *, dtype=bf16, bias=True, device="cuda", seed=0, cls=W4A16Linear):
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
# Operands (no GPU): the layer's own buffers, copies only where the kernel cannot read in place


def test_operands_are_the_layer_buffers():
    layer = make_layer(40, 128, device="cpu")
    dev = torch.device("cpu")
    ops = cuda_w4a16.operands(layer, dev)
    assert all(a is b for a, b in zip(ops, (layer.qweight, layer.wscales, layer.wzeros, layer.bias), strict=True))
    layer.bias = None
    assert cuda_w4a16.operands(layer, dev)[3] is None


def test_operands_copy_what_cannot_be_read_in_place():
    layer = make_layer(40, 128, device="cpu")
    want = [t.clone() for t in (layer.qweight, layer.wscales, layer.wzeros, layer.bias)]
    backing = torch.zeros(40 * 64 + 4, dtype=torch.uint8)
    layer.qweight = backing[4:].view(40, 64)  # contiguous, 4 bytes past an aligned allocation
    layer.qweight.copy_(want[0])
    layer.wscales = want[1].T.contiguous().T  # strided
    layer.bias = want[3].float()              # another dtype than the scales
    ops = cuda_w4a16.operands(layer, torch.device("cpu"))
    assert ops[0].data_ptr() % 8 == 0 and ops[0].is_contiguous() and ops[1].is_contiguous()
    assert ops[2] is layer.wzeros
    assert ops[3].dtype == layer.wscales.dtype
    for got, w in zip(ops, want, strict=True):
        assert torch.equal(got, w)
    layer.wzeros = layer.wzeros.half()
    with pytest.raises(TypeError, match="both be bfloat16 or float16"):
        cuda_w4a16.operands(layer, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------
# The linear on the GPU

MOD_CASES = [
    # M, N, K, layer dtype, input dtype
    *[(m, 18432, 3072, bf16, bf16) for m in (1, 2, 3, 4, 8)],
    *[(m, 9216, 3072, fp16, fp16) for m in (1, 5, 8)],
    (9, 18432, 3072, bf16, bf16),      # past one batch chunk of 8
    (16, 18432, 3072, bf16, bf16),
    (12, 9216, 3072, fp16, fp16),
    (17, 9216, 3072, fp16, fp16),
    (255, 3072, 3072, bf16, bf16),     # "large M": many batch chunks
    (1000, 200, 192, fp16, fp16),
    (4096, 3072, 3072, bf16, bf16),
    (2, 3, 64, bf16, bf16),            # small and odd N (tail guards, clamped loads)
    (7, 40, 128, fp16, fp16),
    (3, 257, 320, bf16, bf16),
    (1, 4099, 3072, bf16, bf16),       # N % 32 == 3 at the real K
    (6, 9217, 3072, fp16, fp16),
    (4, 100, 576, fp16, bf16),         # scales fp16, input bf16
    (4, 1000, 3072, bf16, fp16),       # scales bf16, input fp16
    (13, 18431, 3072, fp16, bf16),
]


@requires_cuda
@pytest.mark.parametrize("M,N,K,layer_dtype,dtype", MOD_CASES)
def test_linear_matches_reference(ext, M, N, K, layer_dtype, dtype):
    layer = make_layer(N, K, dtype=layer_dtype, seed=M + N)
    check_linear(layer, make_input((M,), K, dtype, seed=K))


# K sets the groups per warp (8 warps take every 8th group, 3 groups in flight each): 1 group (7 warps
# idle), 5, 25 (warp 0 one group past a full ring round), 48 (FLUX: two rounds), 100.
@requires_cuda
@pytest.mark.parametrize("N,K", [(1, 64), (7, 320), (16, 1600), (31, 3072), (45, 6400), (77, 1600), (129, 320),
                                 (1027, 3072)])
@pytest.mark.parametrize("layer_dtype,dtype", [(bf16, bf16), (fp16, fp16), (bf16, fp16)])
@pytest.mark.parametrize("bias", [True, False])
def test_small_batches_and_odd_n(ext, N, K, layer_dtype, dtype, bias):
    layer = make_layer(N, K, dtype=layer_dtype, bias=bias, seed=N)
    for M in range(1, 17):
        check_linear(layer, make_input((M,), K, dtype, seed=M))


@requires_cuda
@pytest.mark.parametrize("bias", [True, False])
def test_module_dispatch_batched_and_noncontiguous(ext, bias):
    K = 3072
    layer = make_layer(9216, K, bias=bias)
    check_linear(layer, make_input((2, 1), K, bf16), via_module=True)  # modulation: [B, 1, K]
    wide = make_input((6,), K + 64, bf16)
    check_linear(layer, wide[:, 8:8 + K])        # row stride K+64, read in place
    check_linear(layer, wide[:, 4:4 + K])        # 8-byte offset: copied (16-byte loads)
    check_linear(layer, make_input((K,), 5, bf16).T)  # column stride != 1
    check_linear(layer, make_input((3, 4), K, bf16)[:, ::2])


@requires_cuda
def test_reads_the_buffers_in_place(ext):
    """No repacked copy: no backend state, no device memory beyond the output, and in-place writes
    to the buffers are what the next call computes with."""
    layer = make_layer(18432, 3072)
    x = make_input((2,), 3072, bf16)
    cuda_backend.w4a16_linear(layer, x)  # first call: builds, warms the allocator
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    ptrs = [t.data_ptr() for t in (layer.qweight, layer.wscales, layer.wzeros, layer.bias)]
    state = dict(layer.__dict__)
    y = cuda_backend.w4a16_linear(layer, x)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before == -(-y.numel() * y.element_size() // 512) * 512  # the output
    assert layer.__dict__.keys() == state.keys()  # the backend keeps nothing on the layer
    assert [t.data_ptr() for t in (layer.qweight, layer.wscales, layer.wzeros, layer.bias)] == ptrs
    layer.wscales.mul_(0.5)
    layer.wzeros.add_(0.01)
    layer.qweight.bitwise_xor_(0x11)
    layer.bias.neg_()
    check_linear(layer, x)


@requires_cuda
def test_buffers_not_readable_in_place(ext):
    """A layer on the CPU with x on the GPU, a strided / misaligned buffer, a bias of another dtype:
    the call copies what it must, for that call only, and computes the same."""
    N, K = 1000, 3072
    layer = make_layer(N, K, seed=3)
    x = make_input((3,), K, bf16)
    y0 = check_linear(layer, x)
    on_cpu = make_layer(N, K, seed=3).to("cpu")
    assert torch.equal(cuda_backend.w4a16_linear(on_cpu, x), y0)
    assert on_cpu.qweight.device.type == "cpu" and on_cpu.__dict__.keys() == make_layer(N, K, seed=3).__dict__.keys()
    backing = torch.zeros(N * K // 2 + 4, dtype=torch.uint8, device="cuda")
    qweight = backing[4:].view(N, K // 2)
    qweight.copy_(layer.qweight)
    layer.qweight = qweight                      # data_ptr % 8 == 4
    layer.wscales = layer.wscales.T.contiguous().T
    layer.bias = layer.bias.float()
    assert torch.equal(cuda_backend.w4a16_linear(layer, x), y0)


@requires_cuda
def test_binding_checks(ext):
    N, K = 40, 128
    layer = make_layer(N, K)
    x = make_input((2,), K, bf16)
    args = dict(qweight=layer.qweight, wscales=layer.wscales, wzeros=layer.wzeros, bias=layer.bias)
    assert torch.equal(ext.w4a16_gemv(x, **args), cuda_backend.w4a16_linear(layer, x))
    no_bias = make_layer(N, K, bias=False)  # same seed: the same codes, scales and zeros
    assert torch.equal(ext.w4a16_gemv(x, **{**args, "bias": None}), cuda_backend.w4a16_linear(no_bias, x))
    bad = [
        ({"qweight": layer.qweight[:, :K // 4]}, "qweight"),
        ({"qweight": layer.qweight.view(torch.int8)}, "qweight"),
        ({"wscales": layer.wscales.half()}, "wscales and wzeros"),
        ({"wzeros": layer.wzeros[:, :N - 1]}, "wscales and wzeros"),
        ({"wscales": layer.wscales.float()}, "bfloat16 or float16"),
        ({"bias": layer.bias.float()}, "bias"),
        ({"bias": layer.bias[:N - 1]}, "bias"),
        ({"bias": layer.bias.cpu()}, "bias"),
    ]
    for change, message in bad:
        with pytest.raises(RuntimeError, match=message):
            ext.w4a16_gemv(x, **{**args, **change})
    with pytest.raises(RuntimeError, match="multiple of 64"):
        ext.w4a16_gemv(x[:, :96].contiguous(), **{**args, "qweight": layer.qweight[:, :48].contiguous()})


@requires_cuda
def test_lora_subclass(ext):
    """nunchaku_ext.lora's W4A16LinearLoRA adds its branch after the kernel; a bias patch (a new bias
    tensor) is read like any buffer."""
    N, K = 3072, 3072
    layer = make_layer(N, K, cls=W4A16LinearLoRA)
    x = make_input((3,), K, bf16)
    check_linear(layer, x, via_module=True)
    g = torch.Generator(device="cuda").manual_seed(5)
    down = (torch.randn(8, K, generator=g, device="cuda") / 50).to(bf16)
    up = (torch.randn(N, 8, generator=g, device="cuda") / 50).to(bf16)
    layer.set_adapters(AdapterSet(down, up, torch.randn(N, generator=g, device="cuda").to(bf16)))
    y = layer(x)
    layer.backend = "reference"
    y_ref = layer(x)
    layer.backend = "cuda"
    # Both add the same bf16 branch to their base output (checked against each other here, bias patch
    # included) and round once more: the difference grows by at most one output ulp.
    base = check_linear(layer, x)
    base_gap = (base.float() - reference.w4a16_linear(layer, x).float()).abs()
    eps = torch.finfo(bf16).eps
    assert ((y.float() - y_ref.float()).abs() <= base_gap + eps * torch.maximum(y.float().abs(), y_ref.float().abs())).all()
    layer.set_adapters(None)
    check_linear(layer, x, via_module=True)


@requires_cuda
def test_repeatable(ext):
    layer = make_layer(18432, 3072)
    x = make_input((4,), 3072, bf16)
    y0 = cuda_backend.w4a16_linear(layer, x)
    for _ in range(3):
        assert torch.equal(cuda_backend.w4a16_linear(layer, x), y0)


def test_turing_runs_the_reference_with_a_warning(monkeypatch, caplog):
    """sm_75 has no m16n8k16 16-bit MMA: the layer must still work (reference backend), and say so."""
    monkeypatch.setattr(cuda_build, "device_arch", lambda device=None: "7.5")
    monkeypatch.setattr(cuda_w4a16, "_warned_turing", [])
    layer = make_layer(40, 128, device="cpu")
    x = torch.randn(3, 128).to(bf16)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # CPU tensors stand in for sm_75 ones
    with caplog.at_level("WARNING"):
        y = cuda_w4a16.forward(None, layer, x)
    assert torch.equal(y, reference.w4a16_linear(layer, x))
    assert "sm_75" in caplog.text and "reference backend" in caplog.text
