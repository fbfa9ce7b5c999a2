"""The SVDQuant FLUX loader node: our file -> ComfyUI's own FLUX model with 4-bit layers in place.

The model is ComfyUI's (comfy.model_base.Flux around comfy.ldm.flux.model.Flux, picked by
ComfyUI's model detection from the file's config, so dev/schnell/Fill/Kontext/... behave as with
UNETLoader). It is built on the meta device with the operations ComfyUI would pick for its dense
layers, the quantized linears are replaced by our layers, and the file's tensors are assigned
without copies. Nunchaku's checkpoints (a single file, or the older folder) are converted to our
format in memory on the way in (nunchaku_ext.nunchaku_import); their single blocks' linear1 /
linear2 become split linears. The double blocks' MLPs are then swapped for modules that run
fc1 -> GELU -> fc2 through the backend's fused MLP where it applies (nodes.ops.ComfySVDQMLP).
"""
import dataclasses
import os

import torch

import comfy.ldm.flux.model
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import folder_paths

from nunchaku_ext import backends
from nunchaku_ext.format import CheckpointError, load_checkpoint, read_header, FORMAT_NAME
from nunchaku_ext.layers import replace_mlps
from nunchaku_ext.models import check_flux1_checkpoint
from nunchaku_ext.nunchaku_import import import_nunchaku
from nunchaku_ext.nunchaku_layout import FOLDER_FILES, is_nunchaku_metadata

from .lora_patches import install_adapters
from .ops import ComfySplitLinear, ComfySVDQMLP, make_comfy_module

COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
BACKENDS = ("auto", "cuda", "reference")
DEVICES = ("default", "cpu")

# A Nunchaku folder (the older form) is listed by its own name: FOLDER_FILES plus this file.
NUNCHAKU_FOLDER_CONFIG = "comfy_config.json"

_format_cache = {}  # path -> ((mtime, size), is a file we load)


def _is_loadable_file(path):
    """Ours or Nunchaku's single file, told from the safetensors header alone (cached by mtime)."""
    stat = os.stat(path)
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _format_cache.get(path)
    if cached is None or cached[0] != stamp:
        try:
            meta, _ = read_header(path)
            loadable = meta.get("format") == FORMAT_NAME or is_nunchaku_metadata(meta)
        except (CheckpointError, OSError):
            loadable = False
        _format_cache[path] = cached = (stamp, loadable)
    return cached[1]


def _is_nunchaku_folder(path):
    return all(os.path.isfile(os.path.join(path, f)) for f in (*FOLDER_FILES, NUNCHAKU_FOLDER_CONFIG))


def svdquant_files():
    """Loadable names in models/diffusion_models: our files, Nunchaku's single files, and Nunchaku
    folders (listed as the folder's name; ComfyUI lists the files inside them)."""
    names, folders = [], set()
    for name in folder_paths.get_filename_list("diffusion_models"):
        path = folder_paths.get_full_path("diffusion_models", name)
        if not (name.endswith(".safetensors") and path):
            continue
        folder, _, file = name.replace(os.sep, "/").rpartition("/")
        if folder and file == FOLDER_FILES[0] and _is_nunchaku_folder(os.path.dirname(path)):
            folders.add(folder)
        elif file not in FOLDER_FILES and _is_loadable_file(path):
            names.append(name)
    return sorted(names + list(folders))


def resolve_model_path(name):
    """A listed name -> the file or Nunchaku folder it names, under models/diffusion_models."""
    for base in folder_paths.get_folder_paths("diffusion_models"):
        path = os.path.join(base, name)
        if os.path.isdir(path) and _is_nunchaku_folder(path):
            return path
    return folder_paths.get_full_path_or_raise("diffusion_models", name)


def read_model(path):
    """Our file, or a Nunchaku file or folder converted to our format -> (CheckpointInfo, tensors)."""
    if os.path.isdir(path):
        return import_nunchaku(path)
    meta, _ = read_header(path)
    if meta.get("format") != FORMAT_NAME and is_nunchaku_metadata(meta):
        return import_nunchaku(path)
    return load_checkpoint(path)


def resolve_backend(choice, precision, load_device):
    if choice == "reference":
        return "reference"
    on_cuda = load_device.type == "cuda"
    if choice == "auto" and not on_cuda:
        return "reference"
    if not on_cuda:
        raise RuntimeError(f"SVDQuant: backend 'cuda' needs a CUDA device; this model loads on {load_device}. "
                           "Choose backend 'auto' or 'reference'.")
    cuda = backends.get("cuda")
    if precision == "nvfp4":  # NVFP4 kernels need sm_80 or newer: refuse here, not in the first step
        try:
            cuda.nvfp4_mma_path(torch.cuda.get_device_capability(load_device))
        except NotImplementedError as e:
            raise RuntimeError(f"SVDQuant: {e}") from None
    ok, reason = cuda.available()
    if not ok:
        raise RuntimeError(f"SVDQuant: the CUDA kernels are not available: {reason}\n"
                           "Backend 'reference' runs without them (very slow).")
    return "cuda"


def comfy_unet_config(model_config):
    """A file's FLUX.1 config as ComfyUI's own model detection gives it: ComfyUI's Flux takes
    txt_ids_dims since 0.8 (FLUX.1 has no text position axes: []), which configs derived from
    Nunchaku's files, and files made for older ComfyUI, do not carry."""
    config = dict(model_config, image_model="flux")
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
        config.setdefault("txt_ids_dims", [])
    return config


def load_svdquant_flux(path, compute_dtype="default", backend="auto", device="default"):
    """-> ModelPatcher of ComfyUI's FLUX model with the file's 4-bit layers."""
    info, tensors = read_model(path)
    try:
        check_flux1_checkpoint(info)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None

    unet_config = comfy_unet_config(info.model_config)
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
    markers = set()
    for name, parts in info.modules().items():
        parent, _, child = name.rpartition(".")
        module = make_comfy_module(parts, info.precision, info.dtype, device="meta")
        for layer in module.children() if isinstance(module, ComfySplitLinear) else [module]:
            layer.backend = layer_backend
        markers.update(f"{name}.{key}" for key in module.marker_keys)
        setattr(diffusion_model.get_submodule(parent), child, module)

    missing, unexpected = diffusion_model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if k not in markers]
    if missing or unexpected:
        raise CheckpointError(f"{path}: its tensors do not fit ComfyUI's FLUX model built from its config "
                              f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    left_on_meta = [k for k, t in [*diffusion_model.named_parameters(), *diffusion_model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise CheckpointError(f"{path}: no tensor for {left_on_meta[:5]}")
    # The double blocks' img_mlp / txt_mlp, Sequential(our fc1, GELU(tanh), our fc2), become
    # ComfySVDQMLPs with the same children: the layers' backend runs them fused where it can.
    replace_mlps(diffusion_model, ComfySVDQMLP)
    model.device = offload_device
    model = model.to(offload_device)

    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_LOAD, install_adapters)
    return patcher


class SVDQuantFluxLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (svdquant_files(), {"tooltip": "An SVDQuant FLUX.1 model in models/diffusion_models: "
                                                         "a file of this pack, or Nunchaku's (svdq-int4/fp4 "
                                                         ".safetensors, or its older model folder)."}),
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
        path = resolve_model_path(model_name)
        return (load_svdquant_flux(path, compute_dtype, backend, device),)
