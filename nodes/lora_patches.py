"""Stock LoRA nodes on our MODEL: ComfyUI's patches on quantized layers, absorbed into the low-rank branch.

LoraLoader / LoraLoaderModelOnly map a LoRA's keys (kohya, diffusers/PEFT, BFL, ...) to
"diffusion_model.<layer>.weight" (with a row offset for q/k/v of a fused qkv or linear1) and add
patches to a clone of the ModelPatcher. ModelPatcher applies patches when it loads the model;
the callback below then gives every quantized layer the adapters of the loading patcher's patch
set (none: the base branch). So a changed strength, a removed LoRA, or another branch of the graph
with another LoRA set each load with their own patches; composed adapters are cached per patch set.
A split linear (Nunchaku's linear1 / linear2) takes the patches of the whole linear, divided among
its parts by nunchaku_ext.lora.stack_split_updates. Patches on dense layers are left to ComfyUI.
"""
from collections import OrderedDict

import torch

import comfy.weight_adapter

from nunchaku_ext.layers import SplitLinear
from nunchaku_ext.lora import LowRankUpdate, set_split_adapters, stack_split_updates, stack_updates

from .ops import lora_targets

# Patch sets whose composed adapters are kept (per model and layer, on the offload device).
CACHED_PATCH_SETS = 4


class SVDQuantLoRAError(ValueError):
    pass


class _Same:
    """Compares by identity and keeps its object alive, so an id in a cache key is never reused."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return isinstance(other, _Same) and other.obj is self.obj


def _signature(patches):
    return tuple((float(strength), _Same(adapter), float(strength_model), offset, _Same(function))
                 for strength, adapter, strength_model, offset, function in patches)


def _lora_keys(adapter):
    keys = sorted(getattr(adapter, "loaded_keys", ()) or ())
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "") if keys else "unknown keys"


def _refuse(layer_name, what, adapter=None):
    source = f" (LoRA keys: {_lora_keys(adapter)})" if adapter is not None else ""
    raise SVDQuantLoRAError(f"SVDQuant: cannot apply {what}{source} to the 4-bit layer '{layer_name}'. Only "
                            "low-rank LoRA adapters can be absorbed into a quantized layer; remove that LoRA "
                            "from the graph or use a plain LoRA version of it.")


def _slice(offset, layer_name, rows, total):
    """ComfyUI's (dim, start, length) patch offset -> first row."""
    if offset is None:
        if rows != total:
            _refuse(layer_name, f"a patch of {rows} rows (the layer has {total})")
        return 0
    dim, start, length = offset
    if dim != 0 or length != rows:
        _refuse(layer_name, f"a patch on slice {offset} of {rows} rows")
    return start


def weight_update(layer_name, layer, patch) -> LowRankUpdate:
    """One ComfyUI patch on "<layer>.weight" -> a LowRankUpdate, or a clear error."""
    strength, adapter, strength_model, offset, function = patch
    if not isinstance(adapter, comfy.weight_adapter.LoRAAdapter):
        kind = getattr(adapter, "name", None) or (adapter[0] if isinstance(adapter, tuple) and len(adapter) == 2
                                                  and isinstance(adapter[0], str) else "full-weight")
        _refuse(layer_name, f"a {kind} patch", adapter if hasattr(adapter, "loaded_keys") else None)
    up, down, alpha, mid, dora_scale, reshape = adapter.weights
    if dora_scale is not None:
        _refuse(layer_name, "a DoRA adapter", adapter)
    if mid is not None or reshape is not None or up.dim() != 2 or down.dim() != 2:
        _refuse(layer_name, "a LoRA with a mid/reshape factor (a conv-style LoCon)", adapter)
    if strength_model != 1.0 or function is not None:
        _refuse(layer_name, "a patch that rescales or transforms the base weight", adapter)
    if down.shape[1] != layer.in_features:
        _refuse(layer_name, f"a LoRA whose down factor takes {down.shape[1]} inputs (the layer takes "
                            f"{layer.in_features})", adapter)
    rank = down.shape[0]
    scale = strength * (alpha / rank if alpha is not None else 1.0)
    row = _slice(offset, layer_name, up.shape[0], layer.out_features)
    return LowRankUpdate(up, down, scale, row)


def bias_delta(layer_name, layer, patches):
    """ComfyUI "diff" patches on "<layer>.bias" -> one delta [N] (fp32), or None."""
    if not patches:
        return None
    delta = torch.zeros(layer.out_features)
    for strength, v, strength_model, offset, function in patches:
        if isinstance(v, tuple) and len(v) == 2 and v[0] == "diff":
            v = v[1]
        if not (isinstance(v, tuple) and len(v) >= 1 and torch.is_tensor(v[0]) and v[0].dim() == 1):
            _refuse(layer_name, "a bias patch other than a plain difference", v if hasattr(v, "loaded_keys") else None)
        if strength_model != 1.0 or function is not None:
            _refuse(layer_name, "a bias patch that rescales or transforms the base bias")
        diff = v[0].float().cpu()
        row = _slice(offset, layer_name, diff.shape[0], layer.out_features)
        delta[row:row + diff.shape[0]] += strength * diff
    return delta


def _compose(name, layer, wpatches, bpatches, device):
    """A layer's patches -> what its set_adapters takes (a split linear: one AdapterSet per part)."""
    updates = [weight_update(name, layer, p) for p in wpatches if p[0] != 0.0]
    bias = bias_delta(name, layer, bpatches)
    if isinstance(layer, SplitLinear):
        dtype = next(iter(layer.children())).lora_up.dtype
        try:
            return stack_split_updates(layer, updates, bias=bias, dtype=dtype, device=device)
        except ValueError as e:  # only a bias patch on parts without a bias is left to fail here
            raise SVDQuantLoRAError(f"SVDQuant: cannot apply the LoRA patches on '{name}': {e}") from None
    return stack_updates(updates, layer.out_features, layer.in_features, bias=bias, dtype=layer.lora_up.dtype,
                         device=device)


def _set_adapters(layer, adapters):
    if isinstance(layer, SplitLinear):
        set_split_adapters(layer, adapters)
    else:
        layer.set_adapters(adapters)


def install_adapters(patcher, *_load_args):
    """ModelPatcher ON_LOAD callback: each quantized layer gets the adapters of `patcher`'s patches."""
    base = patcher.model
    cache = base.__dict__.setdefault("svdquant_adapter_cache", OrderedDict())
    layers = lora_targets(base.diffusion_model)
    for name, layer in layers:
        wpatches = patcher.patches.get(f"diffusion_model.{name}.weight", [])
        bpatches = patcher.patches.get(f"diffusion_model.{name}.bias", [])
        signature = (_signature(wpatches), _signature(bpatches))
        if layer.installed_patches == signature:
            continue
        if not wpatches and not bpatches:
            _set_adapters(layer, None)
        else:
            key = (name, signature)
            adapters = cache.get(key)
            if adapters is None:
                adapters = _compose(name, layer, wpatches, bpatches, patcher.offload_device)
                cache[key] = adapters
                while len(cache) > CACHED_PATCH_SETS * len(layers):
                    cache.popitem(last=False)
            cache.move_to_end(key)
            _set_adapters(layer, adapters)
        layer.installed_patches = signature
