"""The SVDQuant FLUX loader node: our file -> ComfyUI's own FLUX model with 4-bit layers in place.

The model is ComfyUI's (comfy.model_base.Flux around comfy.ldm.flux.model.Flux, picked by
ComfyUI's model detection from the file's config, so dev/schnell/Fill/Kontext/... behave as with
UNETLoader). It is built on the meta device with the operations ComfyUI would pick for its dense
layers, the quantized linears are replaced by our layers, and the file's tensors are assigned
without copies.
"""
import os

import torch

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import folder_paths

from nunchaku_ext import backends
from nunchaku_ext.format import CheckpointError, load_checkpoint, read_header, FORMAT_NAME
from nunchaku_ext.models import check_flux1_checkpoint

from .lora_patches import install_adapters
from .ops import make_comfy_layer

COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
BACKENDS = ("auto", "cuda", "reference")
DEVICES = ("default", "cpu")

_format_cache = {}  # path -> ((mtime, size), is ours)


def _is_svdquant_file(path):
    stat = os.stat(path)
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _format_cache.get(path)
    if cached is None or cached[0] != stamp:
        try:
            meta, _ = read_header(path)
            ours = meta.get("format") == FORMAT_NAME
        except (CheckpointError, OSError):
            ours = False
        _format_cache[path] = cached = (stamp, ours)
    return cached[1]


def svdquant_files():
    names = []
    for name in folder_paths.get_filename_list("diffusion_models"):
        path = folder_paths.get_full_path("diffusion_models", name)
        if name.endswith(".safetensors") and path and _is_svdquant_file(path):
            names.append(name)
    return names


def resolve_backend(choice, precision, load_device):
    if choice == "reference":
        return "reference"
    on_cuda = load_device.type == "cuda"
    if choice == "auto" and not on_cuda:
        return "reference"
    if not on_cuda:
        raise RuntimeError(f"SVDQuant: backend 'cuda' needs a CUDA device; this model loads on {load_device}. "
                           "Choose backend 'auto' or 'reference'.")
    if precision != "int4":
        raise RuntimeError(f"SVDQuant: this is an {precision.upper()} file and this version has GPU kernels for "
                           "INT4 files only. Use the INT4 file of this model, or backend 'reference' (very slow).")
    ok, reason = backends.get("cuda").available()
    if not ok:
        raise RuntimeError(f"SVDQuant: the CUDA kernels are not available: {reason}\n"
                           "Backend 'reference' runs without them (very slow).")
    return "cuda"


def load_svdquant_flux(path, compute_dtype="default", backend="auto", device="default"):
    """-> ModelPatcher of ComfyUI's FLUX model with the file's 4-bit layers."""
    info, tensors = load_checkpoint(path)
    try:
        check_flux1_checkpoint(info)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None

    unet_config = dict(info.model_config, image_model="flux")
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, tensors)
    if model_config is None:
        raise CheckpointError(f"{path}: ComfyUI has no FLUX variant for this config: {info.model_config}")

    load_device = torch.device("cpu") if device == "cpu" else comfy.model_management.get_torch_device()
    offload_device = torch.device("cpu") if device == "cpu" else comfy.model_management.unet_offload_device()
    compute = info.dtype if compute_dtype == "default" else COMPUTE_DTYPES[compute_dtype]
    layer_backend = resolve_backend(backend, info.precision, load_device)
    # Dense tensors stay in the file's dtype; a different compute dtype casts them per call.
    model_config.set_inference_dtype(info.dtype, None if compute == info.dtype else compute)

    model = model_config.get_model(tensors, "", device=torch.device("meta"))
    diffusion_model = model.diffusion_model
    for name, spec in info.layers.items():
        parent, _, child = name.rpartition(".")
        layer = make_comfy_layer(spec, info.precision, info.dtype, device="meta")
        layer.backend = layer_backend
        setattr(diffusion_model.get_submodule(parent), child, layer)

    missing, unexpected = diffusion_model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if not (k.endswith(".weight") and k[:-len(".weight")] in info.layers)]
    if missing or unexpected:
        raise CheckpointError(f"{path}: its tensors do not fit ComfyUI's FLUX model built from its config "
                              f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    left_on_meta = [k for k, t in [*diffusion_model.named_parameters(), *diffusion_model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise CheckpointError(f"{path}: no tensor for {left_on_meta[:5]}")
    model.device = offload_device
    model = model.to(offload_device)

    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_LOAD, install_adapters)
    return patcher


class SVDQuantFluxLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (svdquant_files(), {"tooltip": "An SVDQuant FLUX.1 file (.safetensors) in "
                                                         "models/diffusion_models."}),
            "compute_dtype": (["default", *COMPUTE_DTYPES], {"tooltip": "Activations' dtype; default: the file's "
                                                                        "(bfloat16 for most files)."}),
            "backend": (BACKENDS, {"tooltip": "auto: our CUDA kernels on a GPU, the reference backend on CPU. "
                                              "reference: plain PyTorch, any device, very slow."}),
            "device": (DEVICES, {"tooltip": "default: ComfyUI's device; cpu: run the model on the CPU."}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "loaders/SVDQuant"
    DESCRIPTION = ("Loads a 4-bit SVDQuant FLUX.1 model as ComfyUI's own FLUX model. Stock LoRA nodes work on "
                   "it: their LoRAs are added to the 4-bit layers' low-rank branch.")

    def load(self, model_name, compute_dtype, backend, device):
        path = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
        return (load_svdquant_flux(path, compute_dtype, backend, device),)
