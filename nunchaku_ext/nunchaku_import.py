"""Import a whole Nunchaku SVDQuant FLUX.1 checkpoint into our format, in memory.

`import_nunchaku(path)` reads a single file (safetensors with Nunchaku's metadata) or the older
folder form and returns `(CheckpointInfo, tensors)` exactly as `format.load_checkpoint` would for
one of our files, validated the same way; `format.save_checkpoint` of the result writes it as one.
docs/nunchaku-format.md §5-6 describe the assembly, the config derivation and the un-fusing.

Nunchaku's files compute the original model only up to a change of basis inside attention:
deepcompressor fused the out projection's smoothing s into the v projections, so Nunchaku's
attention output is o / s. The imported model undoes that, so that every activation is the original
dense model's: LoRAs and ComfyUI's attention patches see what they were made for.
"""
import os
from collections import Counter
from contextlib import ExitStack
from dataclasses import replace

import torch

from .format import CheckpointError, CheckpointInfo, check_tensors, info_from_metadata, read_header
from .layers import TensorSpec
from .models import FLUX1_FAMILY, FLUX1_REQUIRED, ModelConfigError, check_flux1_config, flux1_layer_specs
from .nunchaku_layout import (
    ADANORM_SINGLE,
    ADANORM_ZERO,
    DOUBLE_BLOCK_DENSE,
    DOUBLE_BLOCK_LAYERS,
    FOLDER_FILES,
    SINGLE_BLOCK_DENSE,
    SINGLE_BLOCK_LAYERS,
    TOP_LEVEL_DENSE,
    NunchakuFormatError,
    comfy_dense_key,
    comfy_target,
    decode_w4a4,
    decode_w4a16,
    folder_metadata,
    is_nunchaku_metadata,
    read_nunchaku_header,
    split_layer_key,
    swap_halves,
)

DOUBLE, SINGLE = "transformer_blocks", "single_transformer_blocks"
# ComfyUI's FLUX.1 (comfy/model_detection.py): patch 2, RoPE theta 10000, and for 128-dim heads
# the (time, height, width) split of the rotary dimensions.
PATCH_SIZE = 2
THETA = 10000
AXES_DIM_128 = [16, 56, 56]
# Attention out projections, whose smoothing Nunchaku's converter fuses into the v projections
# (deepcompressor convert.py: smooth_fused = "out_proj" in the layer's name), and the layers
# holding those v projections. In a double block both streams' v feed both out projections
# (joint attention), so the one smoothing divides both v projections.
ATTENTION = {
    DOUBLE: (("out_proj", "out_proj_context"), ("qkv_proj", "qkv_proj_context")),
    SINGLE: (("out_proj",), ("qkv_proj",)),
}
FUSED_INTO_V = {proj for projs, _ in ATTENTION.values() for proj in projs}


def _fail(path, message):
    raise NunchakuFormatError(f"{path}: {message}")


def is_nunchaku_checkpoint(path) -> bool:
    """Whether `path` is a Nunchaku checkpoint this importer reads: a folder with Nunchaku's two
    safetensors files, or a safetensors file whose metadata is Nunchaku's."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return all(os.path.isfile(os.path.join(path, f)) for f in FOLDER_FILES)
    try:
        meta, _ = read_header(path)
    except (CheckpointError, OSError):
        return False
    return is_nunchaku_metadata(meta)


class _Source:
    """The tensors of a Nunchaku checkpoint's safetensors file(s), read one at a time: a FLUX
    checkpoint is gigabytes, and besides what is already converted only one layer's tensors are
    held at once. A context manager: leaving it closes the files."""

    def __init__(self, path):
        from safetensors import safe_open

        folder = os.path.isdir(path)
        files = [os.path.join(path, f) for f in FOLDER_FILES] if folder else [path]
        self.metadata = folder_metadata(path) if folder else None
        self.specs, self._file = {}, {}
        for file in files:
            try:
                meta, specs = read_header(file)
            except CheckpointError as e:
                raise NunchakuFormatError(str(e)) from None
            if not folder:
                if not is_nunchaku_metadata(meta):
                    _fail(path, "not a Nunchaku checkpoint: its metadata has no 'quantization_config' and no "
                                "Nunchaku 'model_class'")
                self.metadata = meta
            for name in specs:
                if name in self._file:
                    _fail(path, f"tensor '{name}' is in both {self._file[name]} and {file}")
                self._file[name] = file
            self.specs.update(specs)
        self._files = ExitStack()
        self._handles = {file: self._files.enter_context(safe_open(file, framework="pt", device="cpu"))
                         for file in files}

    def get(self, name):
        return self._handles[self._file[name]].get_tensor(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._files.close()


def _depth(names, kind):
    """Number of blocks of a kind: one more than the highest index (a gap shows as missing layers)."""
    return 1 + max((int(n.split(".", 2)[1]) for n in names if n.startswith(kind + ".")), default=-1)


def _derive_model_config(path, header, dense_shapes, layer_specs, depth, depth_single):
    """ComfyUI Flux constructor arguments (models.FLUX1_REQUIRED), from the tensors' shapes.
    dense_shapes: ComfyUI name -> shape; layer_specs: Nunchaku layer name -> {suffix: TensorSpec}."""
    hidden, patch_in = dense_shapes["img_in.weight"]
    head_dim = dense_shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    if hidden % head_dim:
        _fail(path, f"hidden size {hidden} is not a multiple of the attention head size {head_dim}")
    axes_dim = header.diffusers_config.get("axes_dims_rope")
    if axes_dim is None:
        if head_dim != 128:
            _fail(path, f"cannot tell the rotary axes for heads of {head_dim}: the file has no diffusers config "
                        "with 'axes_dims_rope'")
        axes_dim = AXES_DIM_128
    qkv_bias = {"bias" in layer_specs[f"{DOUBLE}.{i}.{local}"]
                for i in range(depth) for local in ("qkv_proj", "qkv_proj_context")}
    if len(qkv_bias) > 1:
        _fail(path, "some qkv projections have a bias and others do not")
    # The MLP width as stored: Nunchaku pads it to 128, which every FLUX.1 width already is.
    mlp_in = layer_specs[f"{DOUBLE}.0.mlp_fc1"]
    if "qweight" not in mlp_in:
        _fail(path, f"tensor '{DOUBLE}.0.mlp_fc1.qweight' is missing")
    mlp_width = mlp_in["qweight"].shape[0]
    config = {
        "in_channels": patch_in // PATCH_SIZE ** 2,
        "out_channels": dense_shapes["final_layer.linear.weight"][0] // PATCH_SIZE ** 2,
        "vec_in_dim": dense_shapes["vector_in.in_layer.weight"][1],
        "context_in_dim": dense_shapes["txt_in.weight"][1],
        "hidden_size": hidden,
        "mlp_ratio": mlp_width / hidden,
        "num_heads": hidden // head_dim,
        "depth": depth,
        "depth_single_blocks": depth_single,
        "axes_dim": [int(a) for a in axes_dim],
        "theta": THETA,
        "patch_size": PATCH_SIZE,
        "qkv_bias": qkv_bias.pop(),
        "guidance_embed": "guidance_in.in_layer.weight" in dense_shapes,
    }
    stated = header.comfy_model_config
    mismatches = [f"{k}: comfy_config says {stated[k]!r}, the tensors give {config[k]!r}"
                  for k in FLUX1_REQUIRED if k in stated and stated[k] != config[k]]
    if mismatches:
        _fail(path, "its comfy_config does not match its tensors:\n  " + "\n  ".join(mismatches))
    try:
        check_flux1_config(config)
    except ModelConfigError as e:
        _fail(path, str(e))
    return config


def _expected_dense(depth, depth_single, guidance):
    """Nunchaku names of every dense tensor a FLUX.1 checkpoint has."""
    names = [f"{module}.{suffix}" for module in TOP_LEVEL_DENSE for suffix in ("weight", "bias")
             if guidance or "guidance_embedder" not in module]
    names += [f"{DOUBLE}.{i}.{local}" for i in range(depth) for local in DOUBLE_BLOCK_DENSE]
    names += [f"{SINGLE}.{i}.{local}" for i in range(depth_single) for local in SINGLE_BLOCK_DENSE]
    return names


def _layer_shape(target, module_specs):
    """(in_features, out_features) of the Nunchaku layer that computes `target`."""
    whole = module_specs[target.module]
    if target.slice is None:
        return whole.in_features, whole.out_features
    _, mode, start, stop = target.slice
    return (whole.in_features, stop - start) if mode == "rows" else (stop - start, whole.out_features)


def _unfuse_attention(path, decoded, block, kind, hidden):
    """Undo the smoothing that Nunchaku's converter fused from the attention out projections into
    the v projections (decoded: Nunchaku layer name -> DecodedLayer, changed in place).

    With s = smooth_orig / smooth of the out projections, Nunchaku's v rows are the original ones
    divided by s and its out projections read o / s. Here the out projections read o: their
    quantized branch divides by smooth_orig (= smooth * s) instead of smooth, and their lora_down,
    which acts on the raw input, is divided by s. The v rows [2h, 3h) of the qkv projections (q, k,
    v concatenated in both Nunchaku's and ComfyUI's layout) are multiplied by s: their output
    scale (int4: group scales, one bf16/fp16 rounding; nvfp4: wcscales, exact in fp32), lora_up
    rows and bias (one rounding each)."""
    projs, qkvs = (tuple(f"{block}.{local}" for local in names) for names in ATTENTION[kind])
    origs = [decoded[p].smooth_orig for p in projs]
    if all(o is None for o in origs):
        return
    scales = [None if o is None else o.float() / decoded[p].tensors["smooth"].float() for p, o in zip(projs, origs)]
    if any(s is None or not torch.equal(s, scales[0]) for s in scales):
        _fail(path, f"{', '.join(projs)} carry different fused smoothing (smooth_orig / smooth); their inputs "
                    "come from one joint attention, so Nunchaku's converter fuses one smoothing into both v "
                    "projections, and this importer cannot undo anything else")
    s = scales[0]
    for proj in projs:
        layer = decoded[proj]
        t = dict(layer.tensors)
        t["smooth"] = layer.smooth_orig
        t["lora_down"] = (t["lora_down"].float() / s).to(t["lora_down"].dtype)
        decoded[proj] = replace(layer, tensors=t, smooth_orig=None)
    v = slice(2 * hidden, 3 * hidden)
    for qkv in qkvs:
        layer = decoded[qkv]
        t = {k: x.clone() for k, x in layer.tensors.items()}
        if layer.precision == "int4":
            t["wscales"][:, v] = (t["wscales"][:, v].float() * s).to(t["wscales"].dtype)
        else:
            t["wcscales"][v] *= s
        t["lora_up"][v] = (t["lora_up"][v].float() * s[:, None]).to(t["lora_up"].dtype)
        if "bias" in t:
            t["bias"][v] = (t["bias"][v].float() * s).to(t["bias"].dtype)
        decoded[qkv] = replace(layer, tensors=t)


def _sort_tensors(path, names):
    """Nunchaku layer name -> its tensors' suffixes, and dense Nunchaku name -> (ComfyUI name, swap)."""
    layers, dense = {}, {}
    for name in names:
        layer, suffix = split_layer_key(name)
        if layer is not None:
            layers.setdefault(layer, []).append(suffix)
            continue
        try:
            dense[name] = comfy_dense_key(name)
        except NunchakuFormatError as e:
            _fail(path, f"unknown tensor: {e}")
    return layers, dense


def _check_complete(path, layers, dense, depth, depth_single):
    """Every quantized layer of every block, and every dense tensor of FLUX.1, must be there."""
    missing = [f"{kind}.{i}.{local}" for kind, blocks, table in ((DOUBLE, depth, DOUBLE_BLOCK_LAYERS),
                                                                  (SINGLE, depth_single, SINGLE_BLOCK_LAYERS))
               for i in range(blocks) for local in table if f"{kind}.{i}.{local}" not in layers]
    guidance = "time_text_embed.guidance_embedder.linear_1.weight" in dense
    missing += [n for n in _expected_dense(depth, depth_single, guidance) if n not in dense]
    if missing:
        _fail(path, f"{len(missing)} tensor(s) or quantized layer(s) missing: " + ", ".join(missing[:20])
              + (" ..." if len(missing) > 20 else ""))


def _decode(path, source, layer, suffixes, target, precision, module_specs):
    tensors = {suffix: source.get(f"{layer}.{suffix}") for suffix in suffixes}
    in_features, out_features = _layer_shape(target, module_specs)
    try:
        if target.role in (ADANORM_ZERO, ADANORM_SINGLE):
            return decode_w4a16(tensors, adanorm_splits=target.adanorm_splits, in_features=in_features,
                                out_features=out_features, name=layer)
        decoded = decode_w4a4(tensors, precision, act_unsigned=target.act_unsigned(precision),
                              in_features=in_features, out_features=out_features, name=layer)
    except NunchakuFormatError as e:
        _fail(path, str(e))
    if decoded.smooth_orig is not None and layer.split(".", 2)[2] not in FUSED_INTO_V:
        _fail(path, f"layer '{layer}' has smooth_orig different from smooth; Nunchaku's converter fuses the "
                    "smoothing of attention out projections only, and this importer cannot undo it elsewhere")
    return decoded


def import_nunchaku(path):
    """A Nunchaku FLUX.1 checkpoint (file or folder) -> (CheckpointInfo, name -> tensor) in our
    format, validated like a file of ours. Raises NunchakuFormatError naming the path."""
    path = os.fspath(path)
    with _Source(path) as source:
        header = read_nunchaku_header(source.metadata, source.specs, where=path)
        layer_names, dense_names = _sort_tensors(path, source.specs)
        depth, depth_single = _depth(source.specs, DOUBLE), _depth(source.specs, SINGLE)
        if depth == 0:
            _fail(path, "it has no transformer_blocks: not a FLUX.1 model")
        _check_complete(path, layer_names, dense_names, depth, depth_single)

        dense_shapes = {key: source.specs[name].shape for name, (key, _) in dense_names.items()}
        layer_specs = {layer: {suffix: source.specs[f"{layer}.{suffix}"] for suffix in suffixes}
                       for layer, suffixes in layer_names.items()}
        config = _derive_model_config(path, header, dense_shapes, layer_specs, depth, depth_single)
        hidden = config["hidden_size"]
        module_specs = flux1_layer_specs(config, rank=0, precision=header.precision)
        targets = {layer: comfy_target(layer, hidden, int(hidden * config["mlp_ratio"])) for layer in layer_names}
        decoded = {layer: _decode(path, source, layer, suffixes, targets[layer], header.precision, module_specs)
                   for layer, suffixes in sorted(layer_names.items())}
        dense = {key: swap_halves(source.get(name)) if swap else source.get(name)
                 for name, (key, swap) in dense_names.items()}
    for kind, blocks in ((DOUBLE, depth), (SINGLE, depth_single)):
        for i in range(blocks):
            _unfuse_attention(path, decoded, f"{kind}.{i}", kind, hidden)

    dtypes = {layer.tensors["smooth" if layer.spec.kind == "w4a4" else "wscales"].dtype for layer in decoded.values()}
    if len(dtypes) > 1:
        _fail(path, f"its quantized layers mix 16-bit dtypes {sorted(map(str, dtypes))}")
    layers, tensors = {}, dense
    for layer, d in decoded.items():
        target = targets[layer]
        if target.slice is None:
            name, spec = target.module, d.spec
        else:  # a part of linear1 / linear2, named by the Nunchaku layer it was
            _, mode, start, stop = target.slice
            name, spec = f"{target.module}.{layer.split('.', 2)[2]}", replace(d.spec, part=(mode, start, stop))
        layers[name] = spec
        tensors.update({f"{name}.{suffix}": t for suffix, t in d.tensors.items()})

    ranks = Counter(spec.rank for spec in layers.values() if spec.kind == "w4a4")
    info = CheckpointInfo(precision=header.precision, rank=ranks.most_common(1)[0][0], dtype=dtypes.pop(),
                          model_family=FLUX1_FAMILY, model_config=config, layers=layers)
    try:
        info_from_metadata(path, info.to_metadata())
        check_tensors(path, info, {k: TensorSpec(tuple(t.shape), t.dtype) for k, t in tensors.items()})
    except CheckpointError as e:
        raise NunchakuFormatError(str(e)) from None
    return info, tensors
