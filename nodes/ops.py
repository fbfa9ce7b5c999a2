"""Our quantized layers as ComfyUI sees them: ModelPatcher's view of a layer, nothing numeric.

ComfyUI's ModelPatcher treats a module with a `comfy_cast_weights` attribute as one it may leave
on the offload device ("low VRAM"): it then sets `comfy_cast_weights = True` and the module must
bring its tensors to the input's device per call. It finds LoRA targets and accepts patches only
for keys in the model's state dict, so each quantized linear of the model has an empty `weight`
marker: the patches on "<name>.weight" are absorbed into the low-rank branch by nodes.lora_patches,
never computed on a dense weight.

A split linear (Nunchaku's single-block linear1 / linear2) is the LoRA target as a whole, so the
marker is on it (with a `bias` marker for bias patches); its parts are the layers ModelPatcher
loads and streams, each with a marker outside the state dict (ModelPatcher reads `<part>.weight`,
and LoRA keys must not map to a part).

A FLUX double block's img_mlp / txt_mlp (Sequential(fc1, GELU(tanh), fc2) of our layers) becomes a
ComfySVDQMLP after loading: the same children under the same names (so the same keys for state dict,
LoRA mapping and ModelPatcher), run through the backend's fused MLP unless ComfyUI streams a layer.
"""
import functools

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.ops

from nunchaku_ext.layers import SplitLinear, make_layer, SVDQMLP
from nunchaku_ext.lora import SVDQW4A4LinearLoRA, W4A16LinearLoRA


def _marker():
    # On the CPU, never on "meta" (a model built there and then loaded with assign=True): an empty
    # tensor costs nothing anywhere, but a meta one could not be moved to a device.
    return torch.empty(0, dtype=torch.uint8)


class _ComfyQuantizedLinear(comfy.ops.CastWeightBiasOp):
    def _init_comfy(self, lora_target):
        self.register_buffer("weight", _marker(), persistent=lora_target)
        self.lora_target = lora_target
        # The patch set whose adapters are installed (see nodes.lora_patches).
        self.installed_patches = None

    @property
    def marker_keys(self):
        return ("weight",) if self.lora_target else ()

    def forward(self, x):
        comfy.ops.run_every_op()
        if self.comfy_cast_weights or self.weight_function or self.bias_function:
            return self._forward_streamed(x)
        return super().forward(x)

    def _forward_streamed(self, x):
        """Low-VRAM path: this layer's tensors stay on the offload device and visit x's device for
        one call. Its LoRA patches are already in its branch (installed when the model loaded)."""
        for f in list(self.weight_function) + list(self.bias_function):
            if not isinstance(f, comfy.model_patcher.LowVramPatch):
                raise RuntimeError(f"SVDQuant: a weight function ({type(f).__name__}) was added to a 4-bit "
                                   "layer; only LoRA patches (absorbed into the low-rank branch) are supported")
        resident = dict(self._buffers)
        non_blocking = comfy.model_management.device_supports_non_blocking(x.device)
        try:
            for name, t in resident.items():
                if t is not None:
                    self._buffers[name] = comfy.model_management.cast_to(t, device=x.device, non_blocking=non_blocking)
            return super().forward(x)
        finally:
            self._buffers.update(resident)


class ComfySVDQW4A4Linear(_ComfyQuantizedLinear, SVDQW4A4LinearLoRA):
    def __init__(self, *args, lora_target=True, **kwargs):
        SVDQW4A4LinearLoRA.__init__(self, *args, **kwargs)
        self._init_comfy(lora_target)


class ComfyW4A16Linear(_ComfyQuantizedLinear, W4A16LinearLoRA):
    def __init__(self, *args, lora_target=True, **kwargs):
        W4A16LinearLoRA.__init__(self, *args, **kwargs)
        self._init_comfy(lora_target)


class ComfySplitLinear(SplitLinear):
    """Not a cast module itself (ModelPatcher would count its parts' tensors twice): its parts are."""

    lora_target = True

    def __init__(self, mode, parts):
        super().__init__(mode, parts)
        self.register_buffer("weight", _marker())
        has_bias = any(self.get_submodule(name).bias is not None for name in self.spans)
        if has_bias:
            self.register_buffer("bias", _marker())
        self.marker_keys = ("weight", "bias") if has_bias else ("weight",)
        self.installed_patches = None


class ComfySVDQMLP(SVDQMLP):
    """nunchaku_ext.layers.SVDQMLP in ComfyUI's model. Not a cast module itself (no tensors of its
    own; ModelPatcher loads and streams its two layers as it did inside the Sequential). A layer that
    ModelPatcher streams in low-VRAM mode (`comfy_cast_weights`, or weight / bias functions: see
    _ComfyQuantizedLinear._forward_streamed) must run its own forward, so the pair then runs as
    children in order; so does any case SVDQMLP itself does not fuse."""

    def layer_computes_directly(self, layer):
        return super().layer_computes_directly(layer) and not (
            getattr(layer, "comfy_cast_weights", False) or getattr(layer, "weight_function", None)
            or getattr(layer, "bias_function", None))

    def forward(self, x):
        comfy.ops.run_every_op()  # what each of its layers does (interrupt check); the fused call skips them
        return super().forward(x)


def make_comfy_layer(spec, precision, dtype, device=None, lora_target=True) -> torch.nn.Module:
    """nunchaku_ext.layers.make_layer with this module's classes (a part of a split linear is no LoRA target)."""
    return make_layer(spec, precision, dtype, device,
                      w4a4_class=functools.partial(ComfySVDQW4A4Linear, lora_target=lora_target),
                      w4a16_class=functools.partial(ComfyW4A16Linear, lora_target=lora_target))


def make_comfy_module(parts, precision, dtype, device=None) -> torch.nn.Module:
    """The module for one quantized linear of the model; `parts` as CheckpointInfo.modules() gives it
    (the single part "" for a whole layer)."""
    if set(parts) == {""}:
        return make_comfy_layer(parts[""], precision, dtype, device)
    (mode,) = {spec.part[0] for spec in parts.values()}  # format.py checked that parts split one way
    return ComfySplitLinear(mode, {name: (spec.part[1], spec.part[2],
                                          make_comfy_layer(spec, precision, dtype, device, lora_target=False))
                                   for name, spec in parts.items()})


def lora_targets(diffusion_model):
    """(name, module) of every quantized linear of the model that takes LoRA patches: whole layers
    and split linears, not the parts of those."""
    return [(name, m) for name, m in diffusion_model.named_modules() if getattr(m, "lora_target", False)]
