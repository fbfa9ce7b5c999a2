"""The node pack in a real ComfyUI (headless, CPU): import, /object_info, and each workflow's API graph
run with the tiny models, once through BF16 UNETLoader and once through our loader (reference
backend), with and without stock LoRA nodes. Outputs are compared as latents (cosine) and as
decoded images (PSNR); numbers are printed in the session summary. One test loads a model in this
process (the pack imported as ComfyUI imports it) to look at the modules our loader puts in place."""
import copy
import importlib
import importlib.util
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import RESULTS, load_api_workflow

LORA_FILES = {"flux-lora-style.safetensors": "tiny-kohya.safetensors",
              "flux-lora-detail.safetensors": "tiny-diffusers.safetensors"}
STEPS, SIZE = 4, 128


def tiny_graph(workflow, loader, prefix, loras=None, svdq_model=None):
    """A workflow's API graph with the tiny models: loader 'svdq' (ours) or 'bf16' (UNETLoader).
    `loras` overrides LoraLoaderModelOnly nodes: node id -> (file, strength); `svdq_model` names
    another model for our loader than the tiny SVDQuant file."""
    g = copy.deepcopy(workflow)
    for node in g.values():
        ct, inputs = node["class_type"], node["inputs"]
        if ct == "SVDQuantFluxLoader":
            schnell = "schnell" in inputs["model_name"]
            if loader == "svdq":
                inputs.update(model_name=svdq_model or f"tiny-flux{'-schnell' if schnell else ''}-svdq-int4.safetensors",
                              backend="reference")
            else:
                node["class_type"] = "UNETLoader"
                node["inputs"] = {"unet_name": f"tiny-flux{'-schnell' if schnell else ''}-bf16.safetensors",
                                  "weight_dtype": "default"}
        elif ct == "DualCLIPLoader":
            node["class_type"] = "CLIPLoader"
            node["inputs"] = {"clip_name": "clip_l_random.safetensors", "type": "stable_diffusion", "device": "default"}
        elif ct == "VAELoader":
            inputs["vae_name"] = "taef1"
        elif ct in ("EmptySD3LatentImage", "ModelSamplingFlux"):
            inputs.update(width=SIZE, height=SIZE)
        elif ct == "BasicScheduler":
            inputs["steps"] = STEPS
        elif ct == "LoraLoaderModelOnly":
            inputs["lora_name"] = LORA_FILES.get(inputs["lora_name"], inputs["lora_name"])
        elif ct == "SaveImage":
            inputs["filename_prefix"] = prefix
    for node_id, (name, strength) in (loras or {}).items():
        g[node_id]["inputs"].update(lora_name=name, strength_model=strength)
    for node_id, node in list(g.items()):
        if node["class_type"] == "SamplerCustomAdvanced":
            g[f"latent{node_id}"] = {"class_type": "SaveLatent",
                                     "inputs": {"samples": [node_id, 0], "filename_prefix": f"latents/{prefix}-{node_id}"}}
    return g


def run_outputs(comfy, graph):
    from PIL import Image  # ComfyUI's environment has Pillow; the engine's CI does not need it

    status, outputs = comfy.run(graph)
    assert status.get("status_str") == "success", _error(status)
    latents = {k[len("latent"):]: load_file(comfy.output_file(v["latents"][0]))["latent_tensor"].float()
               for k, v in outputs.items() if k.startswith("latent")}
    images = {k: np.asarray(Image.open(comfy.output_file(v["images"][0])), dtype=np.float64)
              for k, v in outputs.items() if "images" in v}
    return latents, images, status


def _error(status):
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message')}"
    return str(status)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def psnr(a, b):
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def cached_nodes(status):
    return {n for kind, data in status.get("messages", []) if kind == "execution_cached" for n in data["nodes"]}


# Agreement of the 4-bit model with BF16 on the tiny random FLUX (reference backend, 4 steps),
# measured on ComfyUI 618b803d: 0.973 (dev) / 0.998 (schnell) latent cosine without LoRAs; with the
# test LoRAs 0.946-0.973, where the same LoRAs ignored give ~0.79 (random weights have none of the
# structure SVDQuant exploits, and the test LoRAs are strong on purpose).
MIN_COSINE = 0.95
MIN_COSINE_LORA = 0.93


def test_pack_imports_and_registers_its_node(comfy):
    log = comfy.log()
    assert "IMPORT FAILED" not in log and "Cannot import" not in log, log[-3000:]
    info = comfy.get("/object_info/SVDQuantFluxLoader")["SVDQuantFluxLoader"]
    required = info["input"]["required"]
    # ours, Nunchaku's single file and Nunchaku's folder (by its name; the files in it are not listed)
    assert required["model_name"][0] == ["tiny-flux-nunchaku-folder", "tiny-flux-nunchaku-int4.safetensors",
                                         "tiny-flux-schnell-svdq-int4.safetensors", "tiny-flux-split-svdq-int4.safetensors",
                                         "tiny-flux-svdq-int4.safetensors"]
    assert required["backend"][0] == ["auto", "cuda", "reference"]
    assert info["output"] == ["MODEL"]


@pytest.mark.parametrize("name", ["flux1-dev-t2i", "flux1-schnell-t2i"])
def test_workflow_matches_bf16_unet_loader(comfy, name):
    workflow = load_api_workflow(name)
    ref_lat, ref_img, _ = run_outputs(comfy, tiny_graph(workflow, "bf16", f"{name}-bf16"))
    lat, img, _ = run_outputs(comfy, tiny_graph(workflow, "svdq", f"{name}-svdq"))
    (k,) = lat
    c, p = cosine(lat[k], ref_lat[k]), psnr(img["14"], ref_img["14"])
    RESULTS[f"{name}: SVDQuant vs BF16 UNETLoader"] = f"latent cosine {c:.4f}, image PSNR {p:.1f} dB"
    assert c >= MIN_COSINE


def test_two_lora_workflow_matches_bf16_with_the_same_loras(comfy):
    workflow = load_api_workflow("flux1-dev-two-loras")
    ref_lat, ref_img, _ = run_outputs(comfy, tiny_graph(workflow, "bf16", "loras-bf16"))
    lat, img, _ = run_outputs(comfy, tiny_graph(workflow, "svdq", "loras-svdq"))
    no_lora = {"15": ("tiny-kohya.safetensors", 0.0), "16": ("tiny-diffusers.safetensors", 0.0)}
    ref_plain, _, _ = run_outputs(comfy, tiny_graph(workflow, "bf16", "loras-off-bf16", loras=no_lora))
    (k,) = lat
    with_loras, vs_plain = cosine(lat[k], ref_lat[k]), cosine(lat[k], ref_plain[k])
    lora_effect = cosine(ref_lat[k], ref_plain[k])
    RESULTS["flux1-dev-two-loras: SVDQuant+LoRAs vs BF16+LoRAs"] = (
        f"latent cosine {with_loras:.4f}, image PSNR {psnr(img['14'], ref_img['14']):.1f} dB "
        f"(vs BF16 without LoRAs: {vs_plain:.4f}; BF16 with vs without: {lora_effect:.4f})")
    assert lora_effect < 0.9, "the test LoRAs must change the output for this test to mean anything"
    assert with_loras >= MIN_COSINE_LORA
    assert with_loras > vs_plain + 0.1


def two_branch_graph(loader, strengths):
    """One loader, two LoRA chains (kohya on one branch, diffusers on the other), each sampled."""
    g = tiny_graph(load_api_workflow("flux1-dev-t2i"), loader, f"branches-{loader}")
    g["15"] = {"class_type": "LoraLoaderModelOnly",
               "inputs": {"model": ["1", 0], "lora_name": "tiny-kohya.safetensors", "strength_model": strengths[0]}}
    g["16"] = {"class_type": "LoraLoaderModelOnly",
               "inputs": {"model": ["1", 0], "lora_name": "tiny-diffusers.safetensors", "strength_model": strengths[1]}}
    g["6"]["inputs"]["model"] = ["15", 0]
    # The second branch: its own ModelSamplingFlux / guider / scheduler / sampler on the other LoRA.
    for src, dst in [("6", "26"), ("7", "27"), ("10", "30"), ("12", "32")]:
        g[dst] = copy.deepcopy(g[src])
    g["26"]["inputs"]["model"] = ["16", 0]
    g["27"]["inputs"]["model"] = ["26", 0]
    g["30"]["inputs"]["model"] = ["26", 0]
    g["32"]["inputs"].update(guider=["27", 0], sigmas=["30", 0])
    g["latent32"] = {"class_type": "SaveLatent", "inputs": {"samples": ["32", 0], "filename_prefix": f"latents/branches-{loader}-32"}}
    return g


def test_lora_sets_per_branch_strength_change_and_removal_without_reload(comfy):
    settings = [(1.0, 0.7), (0.3, 0.7), (0.0, 1.0)]
    # Our runs first, back to back: ComfyUI keeps the loader's output between prompts that share it.
    got = {}
    for i, strengths in enumerate(settings):
        got[strengths], _, status = run_outputs(comfy, two_branch_graph("svdq", strengths))
        if i:
            assert "1" in cached_nodes(status), "the SVDQuant model must not be reloaded for a new LoRA set"
    for strengths in settings:
        ref, _, _ = run_outputs(comfy, two_branch_graph("bf16", strengths))
        for branch in ("12", "32"):
            c = cosine(got[strengths][branch], ref[branch])
            RESULTS[f"two branches, LoRA strengths {strengths}, branch {branch}"] = f"latent cosine vs BF16 {c:.4f}"
            assert c >= MIN_COSINE_LORA, (strengths, branch, c)

    # No LoRA again after LoRA runs: the base branch is restored exactly.
    base_graph = tiny_graph(load_api_workflow("flux1-dev-t2i"), "svdq", "restored")
    first, _, _ = run_outputs(comfy, base_graph)
    run_outputs(comfy, two_branch_graph("svdq", (1.0, 0.7)))
    # denoise just below 1 gives the same 4 sigmas (int(4 / d) == 4) but makes ComfyUI sample again
    # instead of returning its cached result.
    again_graph = copy.deepcopy(base_graph)
    again_graph["10"]["inputs"]["denoise"] = 0.9999
    again, _, status = run_outputs(comfy, again_graph)
    assert "12" not in cached_nodes(status)
    assert torch.equal(first["12"], again["12"])


def test_non_low_rank_adapter_on_a_quantized_layer_is_a_clear_error(comfy):
    g = tiny_graph(load_api_workflow("flux1-dev-two-loras"), "svdq", "lokr",
                   loras={"15": ("tiny-lokr.safetensors", 1.0), "16": ("tiny-kohya.safetensors", 0.0)})
    status, _ = comfy.run(g)
    message = _error(status)
    assert status.get("status_str") == "error"
    assert "SVDQuant: cannot apply a lokr patch" in message and "double_blocks.0.img_attn.proj" in message, message
    assert "lora_unet_double_blocks_0_img_attn_proj.lokr_w1" in message, message


def test_ui_workflows_are_templates_built_from_their_api_copies(comfy):
    """workflows/*.json are what tests/integration/ui_workflow.py makes from the API copies with this
    ComfyUI's node definitions (so every node exists and every widget value is in its place), and
    ComfyUI lists them in its template browser."""
    import json

    from conftest import REPO
    from ui_workflow import api_to_ui

    object_info = comfy.get("/object_info")
    names = sorted(p.stem for p in (REPO / "workflows" / "api").glob("*.json"))
    for name in names:
        api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
        assert all(node["class_type"] in object_info for node in api.values())
        ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
        assert ui == api_to_ui(api, object_info), f"workflows/{name}.json is stale: rerun ui_workflow.py"
    assert sorted(comfy.get("/workflow_templates")["ComfyUI-SVDQuant"]) == names


NUNCHAKU_FILE, NUNCHAKU_FOLDER = "tiny-flux-nunchaku-int4.safetensors", "tiny-flux-nunchaku-folder"
# The same quantized weights in our format (single blocks split as in Nunchaku's file): the
# imported model differs from it only in the modulation biases, which Nunchaku's file holds with
# +1 folded in (one bf16 rounding, 2^-8, on a third of them).
SPLIT_FILE = "tiny-flux-split-svdq-int4.safetensors"
MIN_COSINE_SAME_WEIGHTS = 0.999


def test_nunchaku_checkpoint_loads_and_matches_bf16_and_our_format(comfy):
    workflow = load_api_workflow("flux1-dev-t2i")
    ref_lat, ref_img, _ = run_outputs(comfy, tiny_graph(workflow, "bf16", "nunchaku-bf16"))
    lat, img, _ = run_outputs(comfy, tiny_graph(workflow, "svdq", "nunchaku-file", svdq_model=NUNCHAKU_FILE))
    folder_lat, _, _ = run_outputs(comfy, tiny_graph(workflow, "svdq", "nunchaku-folder", svdq_model=NUNCHAKU_FOLDER))
    ours_lat, ours_img, _ = run_outputs(comfy, tiny_graph(workflow, "svdq", "nunchaku-ours", svdq_model=SPLIT_FILE))
    (k,) = lat
    vs_bf16, vs_ours = cosine(lat[k], ref_lat[k]), cosine(lat[k], ours_lat[k])
    RESULTS["Nunchaku INT4 file vs BF16 UNETLoader"] = (f"latent cosine {vs_bf16:.4f}, image PSNR "
                                                        f"{psnr(img['14'], ref_img['14']):.1f} dB")
    RESULTS["Nunchaku INT4 file vs the same weights in our format"] = (
        f"latent cosine {vs_ours:.6f}, image PSNR {psnr(img['14'], ours_img['14']):.1f} dB, "
        f"max |latent diff| {(lat[k] - ours_lat[k]).abs().max().item():.2e}")
    assert vs_bf16 >= MIN_COSINE
    assert vs_ours >= MIN_COSINE_SAME_WEIGHTS
    assert torch.equal(folder_lat[k], lat[k]), "the folder form holds the same tensors as the single file"


def test_nunchaku_checkpoint_with_a_lora_on_split_linears_matches_bf16(comfy):
    """A stock LoraLoaderModelOnly LoRA on single_blocks.0.linear1 / linear2 (split linears in the
    imported model; weight and bias) and on a double block's qkv."""
    workflow = load_api_workflow("flux1-dev-two-loras")
    loras = {"15": ("tiny-split.safetensors", 1.0), "16": ("tiny-kohya.safetensors", 0.0)}
    ref_lat, ref_img, _ = run_outputs(comfy, tiny_graph(workflow, "bf16", "nk-lora-bf16", loras=loras))
    lat, img, _ = run_outputs(comfy, tiny_graph(workflow, "svdq", "nk-lora", loras=loras, svdq_model=NUNCHAKU_FILE))
    ours_lat, _, _ = run_outputs(comfy, tiny_graph(workflow, "svdq", "nk-lora-ours", loras=loras,
                                                  svdq_model=SPLIT_FILE))
    no_lora = {"15": ("tiny-split.safetensors", 0.0), "16": ("tiny-kohya.safetensors", 0.0)}
    ref_plain, _, _ = run_outputs(comfy, tiny_graph(workflow, "bf16", "nk-lora-off-bf16", loras=no_lora))
    (k,) = lat
    with_lora, vs_plain = cosine(lat[k], ref_lat[k]), cosine(lat[k], ref_plain[k])
    lora_effect, vs_ours = cosine(ref_lat[k], ref_plain[k]), cosine(lat[k], ours_lat[k])
    RESULTS["Nunchaku INT4 file + split-linear LoRA vs BF16 + LoRA"] = (
        f"latent cosine {with_lora:.4f}, image PSNR {psnr(img['14'], ref_img['14']):.1f} dB (vs BF16 without "
        f"the LoRA: {vs_plain:.4f}; BF16 with vs without: {lora_effect:.4f}; vs our format + LoRA: {vs_ours:.6f})")
    assert lora_effect < 0.9, "the test LoRA must change the output for this test to mean anything"
    assert with_lora >= MIN_COSINE_LORA
    assert with_lora > vs_plain + 0.1
    assert vs_ours >= MIN_COSINE_SAME_WEIGHTS


@pytest.fixture(scope="module")
def pack(comfy_base):
    """This node pack imported in this process the way ComfyUI imports it (a package from
    custom_nodes/, after `comfy`; comfy_base put ComfyUI on sys.path, on the CPU): its nodes.loader
    and nodes.ops."""
    from conftest import REPO

    name = "comfyui_svdquant_pack"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.nodes.loader"), importlib.import_module(f"{name}.nodes.ops")


def _flux_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(1, 16, 8, 8, generator=g).bfloat16(), timestep=torch.tensor([0.7]),
                context=torch.randn(1, 5, 768, generator=g).bfloat16(), y=torch.randn(1, 768, generator=g).bfloat16(),
                guidance=torch.tensor([3.5]))


class _Wrapped(torch.nn.Module):
    """What a user's object patch might put in place of a layer."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def test_loaded_model_runs_its_double_block_mlps_through_the_fused_module(comfy_base, pack, monkeypatch):
    """The loader swaps the double blocks' img_mlp / txt_mlp for ComfySVDQMLP (same children, names and
    keys), the model's output is what the plain Sequentials give, and the fused call is taken exactly
    where it applies: with the 'cuda' backend's dispatch (its kernels stood in for by the reference
    backend, as there is no GPU here) on a fully loaded model, and not in ComfyUI's low-VRAM mode nor
    past an object patch on a layer."""
    import comfy.lora

    from nunchaku_ext.backends import cuda as cuda_backend
    from nunchaku_ext.backends import reference, reference_mlp

    loader, ops = pack
    patcher = loader.load_svdquant_flux(str(comfy_base / "models" / "diffusion_models" / "tiny-flux-svdq-int4.safetensors"),
                                        backend="reference", device="cpu")
    dm = patcher.model.diffusion_model
    mlps = {n: m for n, m in dm.named_modules() if isinstance(m, ops.ComfySVDQMLP)}
    assert sorted(mlps) == ["double_blocks.0.img_mlp", "double_blocks.0.txt_mlp"]
    lora_keys = set(comfy.lora.model_lora_keys_unet(patcher.model, {}).values())
    state = patcher.model_state_dict()
    for name, mlp in mlps.items():
        assert list(mlp._modules) == ["0", "1", "2"]
        assert isinstance(mlp[0], ops.ComfySVDQW4A4Linear) and isinstance(mlp[2], ops.ComfySVDQW4A4Linear)
        assert mlp[2].act_unsigned and mlp[0].backend == mlp[2].backend == "reference"
        for i in ("0", "2"):  # the keys ComfyUI's LoRA mapping and ModelPatcher use
            assert f"diffusion_model.{name}.{i}.weight" in lora_keys
            assert f"diffusion_model.{name}.{i}.qweight" in state
    assert not [n for n, m in dm.named_modules() if type(m) is torch.nn.Sequential and len(m) == 3]

    def run():
        with torch.inference_mode():
            return dm(**_flux_inputs())

    base = run()
    # The Sequentials put back: the same output (the reference backend runs the children either way).
    for name, mlp in mlps.items():
        parent, _, child = name.rpartition(".")
        setattr(dm.get_submodule(parent), child, torch.nn.Sequential(OrderedDict(mlp._modules)))
    assert torch.equal(run(), base)
    for name, mlp in mlps.items():
        parent, _, child = name.rpartition(".")
        setattr(dm.get_submodule(parent), child, mlp)

    # The MLP layers on the 'cuda' backend, whose kernels the reference backend stands in for here.
    calls = []

    def mlp_w4a4(fc1, fc2, x, out=None):
        calls.append(fc1)
        return reference_mlp.mlp_w4a4(fc1, fc2, x)

    monkeypatch.setattr(cuda_backend, "w4a4_linear", reference.w4a4_linear)
    monkeypatch.setattr(cuda_backend, "mlp_w4a4", mlp_w4a4)
    for mlp in mlps.values():
        mlp[0].backend = mlp[2].backend = "cuda"
    cpu = torch.device("cpu")
    try:
        patcher.patch_model(cpu)  # a full load
        assert torch.equal(run(), base)
        assert calls == [mlps["double_blocks.0.img_mlp"][0], mlps["double_blocks.0.txt_mlp"][0]]
        patcher.unpatch_model(cpu)

        calls.clear()
        patcher.patch_model(cpu, lowvram_model_memory=1)  # low VRAM: every layer streamed per call
        assert all(m[0].comfy_cast_weights and m[2].comfy_cast_weights for m in mlps.values())
        assert torch.equal(run(), base) and calls == []
        patcher.unpatch_model(cpu)
        assert not any(m[0].comfy_cast_weights or m[2].comfy_cast_weights for m in mlps.values())

        img_fc2 = mlps["double_blocks.0.img_mlp"][2]
        patcher.add_object_patch("diffusion_model.double_blocks.0.img_mlp.2", _Wrapped(img_fc2))
        patcher.patch_model(cpu)
        assert torch.equal(run(), base) and calls == [mlps["double_blocks.0.txt_mlp"][0]]
        patcher.unpatch_model(cpu)
        assert mlps["double_blocks.0.img_mlp"][2] is img_fc2
    finally:
        for mlp in mlps.values():
            mlp[0].backend = mlp[2].backend = "reference"
