"""layers.SVDQMLP: a block's fc1 -> GELU(tanh) -> fc2 Sequential that runs the backend's fused MLP
(backends.cuda.mlp_w4a4) where it applies and its children in order everywhere else.

CPU tests: the swap (replace_mlps: same children, names, state-dict keys), equality with the
Sequential on the reference backend (exact), the reference backend's mlp_w4a4 entry, and the
dispatch — when the fused call is taken and every case that must fall back — with the cuda
backend's real `mlp_fusable` and its kernels stood in for by the reference backend.

GPU tests (skip without CUDA; each runs once per INT4 MMA path the GPU has): the module takes the
fused kernels and gives exactly backends.cuda.mlp_w4a4's output, which tests/test_cuda_mlp.py holds
to the spec; against the two linears on the cuda backend it differs only by the rounding of the
hidden activation (the same bound as there: relative Frobenius error <= 2^-10); absorbed LoRA
adapters are seen; unfusable pairs, a layer on another device and hooks run the two linears.
"""
import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from nunchaku_ext import backends
from nunchaku_ext.backends import cuda as cuda_backend
from nunchaku_ext.backends import reference, reference_mlp
from nunchaku_ext.layers import SVDQMLP, SVDQW4A4Linear, is_plain_mlp, replace_mlps
from nunchaku_ext.lora import LowRankUpdate, SVDQW4A4LinearLoRA, stack_updates
from nunchaku_ext.quantize import quantize_w4a4
from test_cuda_w4a4 import FLAVOURS, ext, make_input, make_layer, mma_path, requires_cuda  # noqa: F401 (fixtures)

K1, N1, N2 = 128, 256, 192


def make_pair(device="cpu", dtype=torch.bfloat16, *, unsigned=True, cls=SVDQW4A4Linear, r1=16, r2=8, seed=3,
              backend="reference"):
    fc1 = make_layer(N1, K1, r1, dtype=dtype, device=device, seed=seed)
    fc2 = make_layer(N2, N1, r2, unsigned=unsigned, dtype=dtype, device=device, seed=seed + 1)
    if cls is not SVDQW4A4Linear:
        fc1, fc2 = (_as(cls, layer) for layer in (fc1, fc2))
    fc1.backend = fc2.backend = backend
    return fc1, fc2


def _as(cls, layer):
    new = cls(layer.in_features, layer.out_features, layer.rank, bias=layer.bias is not None,
              act_unsigned=layer.act_unsigned, dtype=layer.smooth.dtype, device=layer.smooth.device)
    new.load_state_dict(layer.state_dict())
    return new


def sequential(fc1, fc2):
    return torch.nn.Sequential(fc1, torch.nn.GELU(approximate="tanh"), fc2)


def two_linears(fc1, fc2, x):
    """What the Sequential computes: each layer through its own forward."""
    return fc2(F.gelu(fc1(x), approximate="tanh"))


# ------------------------------------------------------------------------------------------------
# The swap


class _Block(torch.nn.Module):
    def __init__(self, mlp, other):
        super().__init__()
        self.img_mlp, self.other = mlp, other


def test_replace_mlps_keeps_children_names_and_keys():
    fc1, fc2 = make_pair()
    seq = sequential(fc1, fc2)
    dense = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(16, 8))
    root = torch.nn.ModuleDict({"double_blocks": torch.nn.ModuleList([_Block(seq, dense)])})
    keys = list(root.state_dict())
    assert replace_mlps(root) == ["double_blocks.0.img_mlp"]
    mlp = root.double_blocks[0].img_mlp
    assert type(mlp) is SVDQMLP and root.double_blocks[0].other is dense  # dense layers: not ours
    assert list(mlp._modules) == ["0", "1", "2"] and mlp[0] is fc1 and mlp[1] is seq[1] and mlp[2] is fc2
    assert list(root.state_dict()) == keys
    assert replace_mlps(root) == []  # already replaced
    # Still a Sequential (slicing, len, iteration).
    assert len(mlp) == 3 and list(mlp[:2]) == [fc1, seq[1]]


class _SiLUGate(torch.nn.Module):  # ComfyUI's SiLUActivation (mlp_silu_act)
    def forward(self, x):
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


class _MySequential(torch.nn.Sequential):
    pass


def test_only_plain_gelu_tanh_pairs_of_w4a4_layers_are_replaced():
    fc1, fc2 = make_pair()
    signed_fc2 = make_pair(unsigned=False)[1]
    assert is_plain_mlp(sequential(fc1, fc2)) and is_plain_mlp(sequential(fc1, signed_fc2))
    others = [
        torch.nn.Sequential(fc1, torch.nn.GELU(), fc2),  # exact GELU
        torch.nn.Sequential(fc1, _SiLUGate(), fc2),  # FLUX variants' mlp_silu_act
        torch.nn.Sequential(fc1, torch.nn.SiLU(), fc2),
        torch.nn.Sequential(fc1, torch.nn.GELU(approximate="tanh")),
        torch.nn.Sequential(torch.nn.Linear(K1, N1), torch.nn.GELU(approximate="tanh"), fc2),
        _MySequential(fc1, torch.nn.GELU(approximate="tanh"), fc2),
    ]
    for module in others:
        assert not is_plain_mlp(module), module
        root = torch.nn.ModuleDict({"mlp": module})
        assert replace_mlps(root) == [] and root.mlp is module


# ------------------------------------------------------------------------------------------------
# The reference backend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_backend_module_equals_the_sequential_exactly(dtype):
    fc1, fc2 = make_pair(dtype=dtype)
    x = make_input((2, 37), K1, unsigned=False, dtype=dtype, device="cpu")
    want = sequential(fc1, fc2)(x)
    assert torch.equal(want, two_linears(fc1, fc2, x))
    mlp = SVDQMLP(fc1, torch.nn.GELU(approximate="tanh"), fc2)
    assert mlp.fused_backend(x) is None  # the reference backend does not fuse
    y = mlp(x)
    assert y.shape == (2, 37, N2) and y.dtype == dtype and torch.equal(y, want)
    # Its mlp_w4a4 entry is the spec, and gives the same numbers.
    ref = backends.get("reference")
    assert torch.equal(ref.mlp_w4a4(fc1, fc2, x), want)
    assert torch.equal(reference_mlp.mlp_w4a4(fc1, fc2, x), want)
    out = torch.full_like(want, float("nan"))
    assert ref.mlp_w4a4(fc1, fc2, x, out=out) is out and torch.equal(out, want)


def test_every_backend_has_mlp_w4a4():
    for name in backends.names():
        assert callable(backends.get(name).mlp_w4a4), name


# ------------------------------------------------------------------------------------------------
# Dispatch: the cuda backend's mlp_fusable, its kernels replaced by the reference backend


@pytest.fixture
def fused_calls(monkeypatch):
    """The 'cuda' backend on the CPU: w4a4_linear is the reference's, mlp_w4a4 the spec, recorded."""
    calls = []

    def mlp_w4a4(fc1, fc2, x, out=None):
        calls.append((fc1, fc2))
        return reference_mlp.mlp_w4a4(fc1, fc2, x)

    monkeypatch.setattr(cuda_backend, "w4a4_linear", reference.w4a4_linear)
    monkeypatch.setattr(cuda_backend, "mlp_w4a4", mlp_w4a4)
    monkeypatch.setattr(cuda_backend, "release", lambda layer: None, raising=False)
    return calls


def cuda_pair(**kwargs):
    fc1, fc2 = make_pair(backend="cuda", **kwargs)
    x = make_input((41,), K1, unsigned=False, dtype=fc1.smooth.dtype, device="cpu")
    return fc1, fc2, x, sequential(fc1, fc2)(x)


def test_fusable_pair_takes_the_fused_call(fused_calls):
    fc1, fc2, x, want = cuda_pair()
    mlp = SVDQMLP(OrderedDict(sequential(fc1, fc2)._modules))
    assert mlp.fused_backend(x) is cuda_backend
    assert torch.equal(mlp(x), want)  # reference numbers: the fused spec is the two linears exactly
    assert fused_calls == [(fc1, fc2)]


def test_module_follows_the_layers_backend(fused_calls):
    fc1, fc2, x, want = cuda_pair()
    mlp = SVDQMLP(fc1, torch.nn.GELU(approximate="tanh"), fc2)
    fc1.backend = fc2.backend = "reference"
    assert torch.equal(mlp(x), want) and fused_calls == []
    fc1.backend = "cuda"  # fc1 and fc2 on different backends: two linears
    assert torch.equal(mlp(x), want) and fused_calls == []
    fc2.backend = "cuda"
    assert torch.equal(mlp(x), want) and len(fused_calls) == 1


@pytest.mark.parametrize("pair", ["nvfp4", "signed_fc2"])
def test_unfusable_pairs_run_the_children(fused_calls, pair):
    if pair == "nvfp4":
        torch.manual_seed(0)
        fc1 = quantize_w4a4(torch.randn(N1, K1) / 11, torch.randn(N1) / 10, rank=16, precision="nvfp4")
        fc2 = quantize_w4a4(torch.randn(N2, N1) / 16, torch.randn(N2) / 10, rank=8, precision="nvfp4")
        fc1.backend = fc2.backend = "cuda"
        x = make_input((41,), K1, unsigned=False, dtype=torch.bfloat16, device="cpu")
    else:
        fc1, fc2, x, _ = cuda_pair(unsigned=False)
    assert not cuda_backend.mlp_fusable(fc1, fc2)
    mlp = SVDQMLP(fc1, torch.nn.GELU(approximate="tanh"), fc2)
    assert mlp.fused_backend(x) is None
    assert torch.equal(mlp(x), two_linears(fc1, fc2, x)) and fused_calls == []


@pytest.mark.parametrize("where", ["fc1", "gelu", "fc2"])
@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_hooks_on_a_child_run_the_children(fused_calls, where, kind):
    fc1, fc2, x, want = cuda_pair()
    mlp = SVDQMLP(fc1, torch.nn.GELU(approximate="tanh"), fc2)
    seen = []
    child = mlp[{"fc1": 0, "gelu": 1, "fc2": 2}[where]]
    if kind == "forward":
        handle = child.register_forward_hook(lambda m, args, out: seen.append(m))
    else:
        handle = child.register_forward_pre_hook(lambda m, args: seen.append(m))
    assert torch.equal(mlp(x), want) and seen == [child] and fused_calls == []
    handle.remove()
    assert torch.equal(mlp(x), want) and len(fused_calls) == 1


def test_global_hooks_run_the_children(fused_calls):
    fc1, fc2, x, want = cuda_pair()
    mlp = SVDQMLP(fc1, torch.nn.GELU(approximate="tanh"), fc2)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(m))
    try:
        assert torch.equal(mlp(x), want)
    finally:
        handle.remove()
    assert fused_calls == [] and seen == [fc1, mlp[1], fc2, mlp]


def test_replaced_or_patched_children_run_the_children(fused_calls):
    fc1, fc2, x, want = cuda_pair()
    mlp = SVDQMLP(fc1, torch.nn.GELU(approximate="tanh"), fc2)
    # A per-instance forward (a patch wrapping the layer's call).
    fc2.forward = lambda h: SVDQW4A4Linear.forward(fc2, h) * 2
    assert torch.equal(mlp(x), want * 2) and fused_calls == []
    del fc2.forward
    # A replaced activation.
    mlp[1] = torch.nn.GELU()
    assert torch.equal(mlp(x), fc2(F.gelu(fc1(x)))) and fused_calls == []
    mlp[1] = torch.nn.GELU(approximate="tanh")
    # A replaced layer (e.g. an object patch).
    dense = torch.nn.Linear(K1, N1, dtype=torch.bfloat16)
    mlp[0] = dense
    assert torch.equal(mlp(x), fc2(F.gelu(dense(x), approximate="tanh"))) and fused_calls == []
    mlp[0] = fc1
    # A module appended.
    mlp.append(torch.nn.Identity())
    assert torch.equal(mlp(x), want) and fused_calls == []
    del mlp[3]
    assert torch.equal(mlp(x), want) and len(fused_calls) == 1


def test_layers_off_the_input_device_run_the_children(fused_calls):
    fc1, fc2, x, _ = cuda_pair()
    mlp = SVDQMLP(fc1, torch.nn.GELU(approximate="tanh"), fc2)
    assert mlp.fused_backend(x) is cuda_backend
    assert mlp.fused_backend(x.to("meta")) is None  # every layer tensor must be on x's device
    fc2.lora_up = fc2.lora_up.to("meta")
    assert mlp.fused_backend(x) is None


class _Streaming(SVDQMLP):
    """What nodes/ops.ComfySVDQMLP does: a framework's own "not directly" condition."""

    def layer_computes_directly(self, layer):
        return super().layer_computes_directly(layer) and not getattr(layer, "streamed", False)


def test_subclass_conditions_run_the_children(fused_calls):
    fc1, fc2, x, want = cuda_pair()
    mlp = _Streaming(fc1, torch.nn.GELU(approximate="tanh"), fc2)
    fc2.streamed = True
    assert torch.equal(mlp(x), want) and fused_calls == []
    fc2.streamed = False
    assert torch.equal(mlp(x), want) and len(fused_calls) == 1


def test_absorbed_adapters_reach_the_fused_call(fused_calls):
    fc1, fc2, x, base = cuda_pair(cls=SVDQW4A4LinearLoRA)
    mlp = SVDQMLP(fc1, torch.nn.GELU(approximate="tanh"), fc2)
    g = torch.Generator().manual_seed(9)
    for layer in (fc1, fc2):
        update = LowRankUpdate(torch.randn(layer.out_features, 4, generator=g),
                               torch.randn(4, layer.in_features, generator=g) / layer.in_features ** 0.5, 0.8, 0)
        layer.set_adapters(stack_updates([update], layer.out_features, layer.in_features,
                                         bias=torch.randn(layer.out_features, generator=g) * 0.1,
                                         dtype=torch.bfloat16))
    y = mlp(x)
    assert len(fused_calls) == 1 and torch.equal(y, two_linears(fc1, fc2, x))
    assert not torch.equal(y, base)
    fc1.set_adapters(None)
    fc2.set_adapters(None)
    assert torch.equal(mlp(x), base)


# ------------------------------------------------------------------------------------------------
# GPU: the real kernels

@pytest.fixture
def always_fuse(monkeypatch):
    """Fuse at any M, also beside the wgmma path on sm_90 (where the backend runs the pair as two linears)."""
    monkeypatch.setattr(cuda_backend, "FUSED_MLP_MAX_ROWS_BESIDE_WGMMA", 2 ** 31)


GPU_CASES = [
    # input shape, K1, N1, N2, rank fc1, rank fc2, dtype
    ((1, 4096), 3072, 12288, 3072, 32, 32, torch.bfloat16),  # FLUX img_mlp at 1024x1024
    ((1, 512), 3072, 12288, 3072, 32, 32, torch.float16),  # FLUX txt_mlp
    ((2, 65), 192, 64, 136, 32, 7, torch.float16),
]


def gpu_pair(K1, N1, N2, r1, r2, dtype, seed, *, cls=SVDQW4A4Linear):
    fc1 = make_layer(N1, K1, r1, dtype=dtype, seed=seed)
    fc2 = make_layer(N2, N1, r2, unsigned=True, dtype=dtype, seed=seed + 1)
    if cls is not SVDQW4A4Linear:
        fc1, fc2 = _as(cls, fc1), _as(cls, fc2)
        fc1.backend = fc2.backend = "cuda"
    return fc1, fc2


def kernel_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y = fn()
        torch.cuda.synchronize()
    return y, [e.name for e in prof.events()]


def spec_on_cpu(fc1, fc2, x):
    """reference_mlp on CPU copies (tests/test_cuda_w4a4.py: the spec is evaluated on the CPU)."""
    cpu = [copy.deepcopy(layer).to("cpu") for layer in (fc1, fc2)]
    for layer in cpu:
        layer.backend = "reference"
    return reference_mlp.mlp_w4a4(*cpu, x.cpu())


def rel_error(y, ref):
    return ((y.float().cpu() - ref.float().cpu()).norm() / ref.float().cpu().norm()).item()


@requires_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}-{c[3]}-r{c[4]}r{c[5]}-{str(c[6])[6:]}")
def test_gpu_module_runs_fused_and_matches_the_two_linears(mma_path, always_fuse, case):
    shape, K1_, N1_, N2_, r1, r2, dtype = case
    fc1, fc2 = gpu_pair(K1_, N1_, N2_, r1, r2, dtype, seed=11)
    x = make_input(shape, K1_, unsigned=False, dtype=dtype)
    mlp = SVDQMLP(fc1, torch.nn.GELU(approximate="tanh"), fc2)
    assert mlp.fused_backend(x) is cuda_backend
    y, names = kernel_names(lambda: mlp(x))
    fused = [n for n in names if "w4a4_mlp_fc1_kernel" in n]
    assert len(fused) == 1 and FLAVOURS[mma_path.name] in fused[0], names
    assert sum("quantize_act_lora_down_kernel" in n for n in names) == 1, names  # fc1's only
    assert y.shape == (*shape, N2_) and y.dtype == dtype and not y.isnan().any()
    assert torch.equal(y, cuda_backend.mlp_w4a4(fc1, fc2, x))  # what tests/test_cuda_mlp.py checks
    # The Sequential's path on the same backend: two linears, h written in 16 bits.
    two, names = kernel_names(lambda: torch.nn.Sequential.forward(mlp, x))
    assert not any("w4a4_mlp_fc1_kernel" in n for n in names)
    rel = rel_error(y, two)
    print(f"\n{case}: fused module vs two cuda linears, rel. Frobenius error {rel:.2e}")
    assert rel <= 2 ** -10
    if K1_ * N1_ <= 192 * 64:  # the spec on the small case (test_cuda_mlp checks the FLUX sizes)
        assert rel_error(y, spec_on_cpu(fc1, fc2, x)) <= 2 ** -10


@requires_cuda
def test_gpu_module_sees_absorbed_adapters(ext):
    fc1, fc2 = gpu_pair(512, 1024, 384, 32, 16, torch.bfloat16, seed=21, cls=SVDQW4A4LinearLoRA)
    x = make_input((300,), 512, unsigned=False, dtype=torch.bfloat16)
    mlp = SVDQMLP(fc1, torch.nn.GELU(approximate="tanh"), fc2)
    base = mlp(x)
    g = torch.Generator().manual_seed(5)
    for layer in (fc1, fc2):
        update = LowRankUpdate(torch.randn(layer.out_features, 8, generator=g),
                               torch.randn(8, layer.in_features, generator=g) / layer.in_features ** 0.5, 0.7, 0)
        layer.set_adapters(stack_updates([update], layer.out_features, layer.in_features,
                                         bias=torch.randn(layer.out_features, generator=g) * 0.1,
                                         dtype=torch.bfloat16, device="cuda"))
    assert mlp.fused_backend(x) is cuda_backend
    y = mlp(x)
    assert rel_error(y, torch.nn.Sequential.forward(mlp, x)) <= 2 ** -10
    assert rel_error(y, spec_on_cpu(fc1, fc2, x)) <= 2 ** -10
    assert rel_error(y, base) > 1e-2  # the adapters are in
    fc1.set_adapters(None)
    fc2.set_adapters(None)
    assert torch.equal(mlp(x), base)  # the repacked low-rank factors follow the buffers back


def _no_fused_kernel(mlp, x):
    y, names = kernel_names(lambda: mlp(x))
    assert not any("w4a4_mlp_fc1_kernel" in n for n in names), names
    return y


@requires_cuda
def test_gpu_fallbacks_run_the_two_linears(ext, always_fuse):
    torch.manual_seed(7)
    x = make_input((70,), 192, unsigned=False, dtype=torch.bfloat16)
    cases = [("int4", False)]
    if torch.cuda.get_device_capability() >= (8, 0):
        cases.append(("nvfp4", False))
    for precision, unsigned in cases:
        fc1 = quantize_w4a4(torch.randn(256, 192, device="cuda") / 14, torch.randn(256, device="cuda"), rank=16,
                            precision=precision)
        fc2 = quantize_w4a4(torch.randn(128, 256, device="cuda") / 16, torch.randn(128, device="cuda"), rank=16,
                            precision=precision, act_unsigned=unsigned)
        fc1.backend = fc2.backend = "cuda"
        mlp = SVDQMLP(fc1, torch.nn.GELU(approximate="tanh"), fc2)
        assert torch.equal(_no_fused_kernel(mlp, x), two_linears(fc1, fc2, x)), precision

    fc1, fc2 = gpu_pair(192, 256, 128, 16, 16, torch.bfloat16, seed=31)
    mlp = SVDQMLP(fc1, torch.nn.GELU(approximate="tanh"), fc2)
    want = two_linears(fc1, fc2, x)
    # A hook on a child.
    handle = fc1.register_forward_hook(lambda m, args, out: None)
    assert torch.equal(_no_fused_kernel(mlp, x), want)
    handle.remove()
    # fc2's tensors on the CPU (a layer left on the offload device): not fused; the module does what the
    # two linears do (the cuda backend refuses a layer off the input's device, or copies it per call).
    fc2.to("cpu")
    assert mlp.fused_backend(x) is None
    try:
        two = two_linears(fc1, fc2, x)
    except Exception as e:  # noqa: BLE001 (whatever the backend raises, the module must raise it too)
        with pytest.raises(type(e)):
            mlp(x)
    else:
        assert torch.equal(_no_fused_kernel(mlp, x), two)
    fc2.to("cuda")
    _, names = kernel_names(lambda: mlp(x))
    assert any("w4a4_mlp_fc1_kernel" in n for n in names)
