"""The GPU path through a real ComfyUI (issue #4): our loader with backend "cuda" in ComfyUI graphs,
fp16 compute on a bf16 file, ComfyUI's low-VRAM partial loading with 4-bit layers streamed from the
CPU, and ComfyUI's VRAM accounting of our model against torch's allocator.

ComfyUI runs inside the pytest process (comfy_inprocess.py) on the session's tiny models
(conftest.comfy_base), so the tests can look at its ModelPatcher, comfy.model_management and
torch.cuda.memory_allocated() while it works. Skipped unless COMFYUI_DIR is set and CUDA is available.
Run on the GPU machine with tests/integration/device_run.sh (docs/integration.md).
"""
import contextlib
import gc

import pytest
import torch

from nunchaku_ext import backends

from conftest import COMFYUI_DIR, RESULTS, load_api_workflow
from test_comfyui import MIN_COSINE, MIN_COSINE_SAME_WEIGHTS, cosine, psnr, run_outputs, tiny_graph

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MODEL = "tiny-flux-svdq-int4.safetensors"
WORKFLOW = "flux1-dev-t2i"
# The same graph run fully loaded and with layers streamed from the CPU (MLPs unfused in both): the
# same kernels on the same tensors, so the same latents up to nothing but reduction-order noise.
MIN_COSINE_STREAMED = 0.99999
# Share of the model's bytes that ComfyUI may keep on the GPU in the low-VRAM test.
LOWVRAM_FRACTION = 0.5
# VRAM accounting: ComfyUI's loaded_size() against the growth of torch.cuda.memory_allocated(),
# after a forward pass. The margin covers allocator rounding (512 B per tensor) and small per-layer
# state a backend might keep (a few padded fp32 vectors); a second copy of the 4-bit weights is far
# outside it (about +80% of the model on this one).
VRAM_MARGIN_FIXED = 16 << 20
VRAM_MARGIN_SHARE = 0.02


@pytest.fixture(scope="module")
def gpu(comfy_base):
    from comfy_inprocess import InProcessComfy

    comfy = InProcessComfy(COMFYUI_DIR, comfy_base)
    assert not comfy.args.cpu and comfy.mm.get_torch_device().type == "cuda", "ComfyUI must run on the GPU here"
    yield comfy
    comfy.reset()


def svdq_graph(prefix, backend, compute_dtype="default"):
    g = tiny_graph(load_api_workflow(WORKFLOW), "svdq", prefix)
    (loader,) = [n for n in g.values() if n["class_type"] == "SVDQuantFluxLoader"]
    loader["inputs"].update(model_name=MODEL, backend=backend, compute_dtype=compute_dtype, device="default")
    return g


def only(latents):
    (v,) = latents.values()
    return v


@contextlib.contextmanager
def quantized_calls(comfy):
    """Every call of a 4-bit layer module while the block runs: (layer, backend, input dtype, input
    device, device of its qweight at the call, comfy_cast_weights at the call). A global forward
    hook: while it is there the double blocks' MLP modules run their two layers one by one instead
    of through the backend's fused MLP (nunchaku_ext.layers.SVDQMLP)."""
    calls = []
    cls = comfy.ops._ComfyQuantizedLinear

    def hook(module, args):
        if isinstance(module, cls):
            x = args[0] if args else None
            calls.append((module, module.backend, getattr(x, "dtype", None), getattr(x, "device", None),
                          module.qweight.device, bool(module.comfy_cast_weights)))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


BACKEND_OPS = {"w4a4_linear": 1, "w4a16_linear": 1, "mlp_w4a4": 2}  # op -> position of x


@contextlib.contextmanager
def backend_calls(monkeypatch):
    """What the 4-bit layers' backends computed while the block runs, seen at the backends' entry
    points (nunchaku_ext.backends: w4a4_linear, w4a16_linear, the fused mlp_w4a4), so that the model
    runs as it does in production (a module hook would turn off the fused MLP): (backend, op,
    layers, input dtype, input device)."""
    calls = []
    with monkeypatch.context() as m:
        for name in backends.names():
            module = backends.get(name)
            for op, at in BACKEND_OPS.items():
                fn = getattr(module, op, None)
                if fn is None:
                    continue

                def wrapper(*args, _fn=fn, _name=name, _op=op, _at=at, **kwargs):
                    x = args[_at] if len(args) > _at else kwargs.get("x")
                    calls.append((_name, _op, args[:_at], getattr(x, "dtype", None), getattr(x, "device", None)))
                    return _fn(*args, **kwargs)

                m.setattr(module, op, wrapper)
        yield calls


def check_cuda_calls(comfy, calls, dtype):
    """Every 4-bit layer of the model ran on the cuda backend, with `dtype` input on the GPU and its
    tensors there; the double blocks' MLPs through the fused op where the backend fuses them."""
    assert calls, "no 4-bit layer ran"
    assert {(backend, dt, dev.type) for backend, _, _, dt, dev in calls} == {("cuda", dtype, "cuda")}, \
        f"want every 4-bit op on the cuda backend with {dtype} input on the GPU"
    layers = {id(layer): layer for _, _, ls, _, _ in calls for layer in ls}
    assert all(layer.qweight.device.type == "cuda" and layer.wscales.dtype == torch.bfloat16
               for layer in layers.values()), "the file's tensors stay bf16, on the GPU"
    (lm, *_) = comfy.loaded_svdquant()
    total = len(comfy.svdquant_layers(lm.model.model))
    assert len(layers) == total, f"{len(layers)} of the model's {total} 4-bit layers ran"
    fused = sum(op == "mlp_w4a4" for _, op, _, _, _ in calls)
    mlps = getattr(comfy.ops, "ComfySVDQMLP", None)
    if mlps is not None and getattr(backends.get("cuda"), "mlp_fusable", None) is not None:
        assert fused, "the double blocks' MLPs did not run through the cuda backend's fused MLP in ComfyUI"
    return fused


def test_cuda_backend_in_a_graph_matches_bf16_and_the_reference_backend(gpu, monkeypatch):
    gpu.reset()
    bf16_lat, bf16_img, _ = run_outputs(gpu, tiny_graph(load_api_workflow(WORKFLOW), "bf16", "gpu-bf16"))
    ref_lat, ref_img, _ = run_outputs(gpu, svdq_graph("gpu-reference", "reference"))
    with backend_calls(monkeypatch) as calls:
        lat, img, _ = run_outputs(gpu, svdq_graph("gpu-cuda", "cuda"))
    fused = check_cuda_calls(gpu, calls, torch.bfloat16)
    vs_bf16, vs_ref = cosine(only(lat), only(bf16_lat)), cosine(only(lat), only(ref_lat))
    RESULTS["GPU: cuda backend vs BF16 UNETLoader"] = (f"latent cosine {vs_bf16:.4f}, image PSNR "
                                                       f"{psnr(img['14'], bf16_img['14']):.1f} dB "
                                                       f"({len(calls)} backend ops, {fused} fused MLPs)")
    RESULTS["GPU: cuda backend vs reference backend"] = (
        f"latent cosine {vs_ref:.6f}, image PSNR {psnr(img['14'], ref_img['14']):.1f} dB, "
        f"max |latent diff| {(only(lat) - only(ref_lat)).abs().max().item():.2e}; reference vs BF16: "
        f"{cosine(only(ref_lat), only(bf16_lat)):.4f}")
    assert vs_bf16 >= MIN_COSINE
    assert vs_ref >= MIN_COSINE_SAME_WEIGHTS


def test_fp16_compute_on_a_bf16_file(gpu, monkeypatch):
    bf16_lat, _, _ = run_outputs(gpu, tiny_graph(load_api_workflow(WORKFLOW), "bf16", "gpu-bf16"))
    bf16_cuda_lat, _, _ = run_outputs(gpu, svdq_graph("gpu-cuda", "cuda"))
    ref16_lat, _, _ = run_outputs(gpu, svdq_graph("gpu-reference-fp16", "reference", "float16"))
    with backend_calls(monkeypatch) as calls:
        lat, _, _ = run_outputs(gpu, svdq_graph("gpu-cuda-fp16", "cuda", "float16"))
    check_cuda_calls(gpu, calls, torch.float16)
    vs_bf16, vs_ref16 = cosine(only(lat), only(bf16_lat)), cosine(only(lat), only(ref16_lat))
    vs_bf16_compute = cosine(only(lat), only(bf16_cuda_lat))
    RESULTS["GPU: cuda backend, fp16 compute on the bf16 file"] = (
        f"latent cosine vs BF16 UNETLoader {vs_bf16:.4f}, vs reference backend in fp16 {vs_ref16:.6f}, "
        f"vs cuda backend in bf16 {vs_bf16_compute:.6f}")
    assert vs_bf16 >= MIN_COSINE
    assert vs_ref16 >= MIN_COSINE_SAME_WEIGHTS


@contextlib.contextmanager
def vram_budget(comfy, monkeypatch, fraction):
    """ComfyUI's own loading under a VRAM budget for SVDQuant models: load_models_gpu passes each
    LoadedModel the memory it may use (`lowvram_model_memory`, from the free VRAM on a small card);
    here it gets `fraction` of the model's size, and ModelPatcher.load decides which layers stay on
    the offload device and stream (comfy_cast_weights) exactly as it would on such a card."""
    mm = comfy.mm
    original = mm.LoadedModel.model_load
    budgets = []

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        if comfy.is_svdquant(self.model):
            budget = int(fraction * self.model.model_size())
            budgets.append(budget)
            # the memory it may use beyond what it has on the GPU (never 0: that means "no limit")
            lowvram_model_memory = max(1, budget - self.model.loaded_size())
        return original(self, lowvram_model_memory, force_patch_weights)

    monkeypatch.setattr(mm.LoadedModel, "model_load", model_load)
    try:
        yield budgets
    finally:
        monkeypatch.setattr(mm.LoadedModel, "model_load", original)


def test_lowvram_partial_load_streams_layers_and_matches_full_load(gpu, monkeypatch):
    """Both runs under quantized_calls' module hook, which also makes the MLP modules run their
    layers one by one: so the runs differ in the streaming alone (a streamed layer's MLP is never
    fused), and their latents must agree to rounding noise."""
    gpu.reset()
    with quantized_calls(gpu) as calls:
        full_lat, _, _ = run_outputs(gpu, svdq_graph("gpu-cuda-full", "cuda"))
    assert calls and not any(cast for *_, cast in calls), "the first run is fully loaded"

    gpu.reset()  # a fresh model, loaded under the budget
    cls = gpu.ops._ComfyQuantizedLinear
    streamed_calls = []
    forward_streamed = cls._forward_streamed

    def counting(self, x):
        streamed_calls.append(self)
        return forward_streamed(self, x)

    monkeypatch.setattr(cls, "_forward_streamed", counting)
    try:
        with vram_budget(gpu, monkeypatch, LOWVRAM_FRACTION) as budgets, quantized_calls(gpu) as calls:
            low_lat, _, _ = run_outputs(gpu, svdq_graph("gpu-cuda-lowvram", "cuda"))
        assert budgets, "ComfyUI did not load the SVDQuant model through load_models_gpu"
        (lm,) = gpu.loaded_svdquant()
        patcher = lm.model
        layers = gpu.svdquant_layers(patcher.model)
        streamed = {n: m for n, m in layers if m.comfy_cast_weights}
        resident = {n: m for n, m in layers if not m.comfy_cast_weights}
        size, loaded = patcher.model_size(), patcher.loaded_size()
        RESULTS["GPU: low-VRAM partial load"] = (
            f"budget {budgets[0] / 2**20:.0f} MiB of {size / 2**20:.0f} MiB; ComfyUI loaded {loaded / 2**20:.0f} MiB; "
            f"{len(streamed)} of {len(layers)} 4-bit layers streamed ({len(streamed_calls)} streamed calls), "
            f"{len(resident)} resident")
        assert patcher.model.model_lowvram and 0 < loaded < size, "ComfyUI did not load the model partially"
        assert streamed and resident, f"want some 4-bit layers streamed and some resident: {RESULTS['GPU: low-VRAM partial load']}"
        for name, m in streamed.items():
            assert all(t.device.type == "cpu" for t in m.buffers()), f"{name} streams but has tensors on the GPU"
        for name, m in resident.items():
            assert all(t.device.type == "cuda" for t in m.buffers() if t.numel()), f"{name} is resident but not on the GPU"
        called = {id(m) for m in streamed_calls}
        assert called == {id(m) for m in streamed.values()}, "every streamed layer, and only those, ran streamed"
        assert {(backend, x_dev.type) for _, backend, _, x_dev, _, _ in calls} == {("cuda", "cuda")}
        assert all(cast == (w_dev.type == "cpu") for _, _, _, _, w_dev, cast in calls), \
            "at each call: a streamed layer's tensors on the CPU, a resident one's on the GPU"
        kept = [n for n, m in streamed.items() if _tensor_bytes(_attached_state(m), set())]
        assert not kept, f"streamed layers keep backend state on the GPU after their call: {kept[:5]}"
    finally:
        gpu.reset()

    c = cosine(only(low_lat), only(full_lat))
    diff = (only(low_lat) - only(full_lat)).abs().max().item()
    RESULTS["GPU: low-VRAM partial load vs fully loaded"] = (f"latent cosine {c:.7f}, max |latent diff| {diff:.2e}"
                                                             f"{' (bit-identical)' if diff == 0 else ''}")
    assert c >= MIN_COSINE_STREAMED


def _attached_state(module):
    """What a module holds besides its registered buffers, parameters and children: where a backend
    could keep per-layer state of its own (ours keep none)."""
    return {k: v for k, v in module.__dict__.items() if not k.startswith("_")}


def _tensor_bytes(obj, seen):
    """Bytes of the CUDA tensors in `obj` (tensors, dicts, lists, dataclasses)."""
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if obj.is_cuda and key not in seen:
            seen.add(key)
            return obj.untyped_storage().nbytes()
        return 0
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_tensor_bytes(getattr(obj, f), seen) for f in obj.__dataclass_fields__)
    return 0


def _forward(model, dev):
    """One forward of ComfyUI's model (what a sampling step calls); its outputs are freed."""
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        x = torch.randn(1, 16, 16, 16, generator=g).to(dev)
        ctx = torch.randn(1, 77, 768, generator=g).to(dev)
        y = torch.randn(1, 768, generator=g).to(dev)
        out = model.apply_model(x, torch.tensor([0.8], device=dev), c_crossattn=ctx, y=y,
                                guidance=torch.tensor([3.5], device=dev))
        assert out.shape == x.shape and bool(out.isfinite().all())
        del out, x, ctx, y
    torch.cuda.synchronize()
    gc.collect()


def _unload(mm):
    mm.unload_all_models()
    mm.soft_empty_cache(force=True)
    gc.collect()
    torch.cuda.synchronize()


def test_vram_accounting_matches_allocations_and_unload_frees_them(gpu):
    """After ComfyUI loads our model fully on the GPU and it has run, ComfyUI's view of its memory
    (ModelPatcher.model_size() / loaded_size(), the LoadedModel in comfy.model_management) equals
    the growth of torch.cuda.memory_allocated() within VRAM_MARGIN_*; unloading returns it."""
    mm = gpu.mm
    dev = mm.get_torch_device()
    gpu.reset()
    # The whole procedure once first: process-wide allocations made on first use (cuBLAS / cuBLASLt
    # workspaces, the kernels' first launch) are then in the baseline, and only the model's are measured.
    (warm,) = gpu.loader_node().load(MODEL, "default", "cuda", "default")
    mm.load_models_gpu([warm])
    _forward(warm.model, dev)
    _unload(mm)
    del warm
    _unload(mm)
    base = torch.cuda.memory_allocated()
    free_before = mm.get_free_memory(dev)

    (patcher,) = gpu.loader_node().load(MODEL, "default", "cuda", "default")
    assert torch.cuda.memory_allocated() - base < VRAM_MARGIN_FIXED, "the loader put tensors on the GPU itself"
    mm.load_models_gpu([patcher])
    (lm,) = [m for m in mm.current_loaded_models if m.model is patcher]
    size, loaded = patcher.model_size(), patcher.loaded_size()
    assert not patcher.model.model_lowvram and loaded == size, "ComfyUI did not load the model fully"
    assert lm.model_loaded_memory() == loaded and lm.model_offloaded_memory() == 0
    torch.cuda.synchronize()
    after_load = torch.cuda.memory_allocated() - base

    model = patcher.model
    _forward(model, dev)
    after_forward = torch.cuda.memory_allocated() - base
    free_after = mm.get_free_memory(dev)

    layers = gpu.svdquant_layers(model)
    seen = set()
    backend_state = sum(_tensor_bytes(_attached_state(m), seen) for _, m in layers)
    margin = VRAM_MARGIN_FIXED + VRAM_MARGIN_SHARE * loaded
    mib = 2 ** 20
    RESULTS["GPU: VRAM accounting"] = (
        f"ComfyUI model_size {size / mib:.1f} MiB, loaded_size {loaded / mib:.1f} MiB; allocated +{after_load / mib:.1f} "
        f"MiB after load, +{after_forward / mib:.1f} MiB after a forward (backend per-layer state "
        f"{backend_state / mib:.1f} MiB); ComfyUI's free-memory drop {(free_before - free_after) / mib:.1f} MiB; "
        f"margin {margin / mib:.1f} MiB")
    assert abs(after_load - loaded) <= margin, RESULTS["GPU: VRAM accounting"]
    assert abs(after_forward - loaded) <= margin, (
        "ComfyUI's accounting misses GPU memory that the model holds after running: " + RESULTS["GPU: VRAM accounting"])

    _unload(mm)
    left = torch.cuda.memory_allocated() - base
    RESULTS["GPU: after unload_all_models"] = f"allocated {left / mib:+.1f} MiB vs before loading"
    assert not [m for m in mm.current_loaded_models if m.model is patcher]
    assert patcher.loaded_size() == 0
    assert all(t.device.type == "cpu" for t in model.diffusion_model.state_dict().values())
    assert left <= VRAM_MARGIN_FIXED, f"unloading left {left / mib:.1f} MiB on the GPU"
