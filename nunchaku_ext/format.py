"""Our checkpoint format: safetensors with JSON metadata (docs/format.md is its specification).

Loading validates the whole file from its header before any tensor is read: what a file declares
(precision, layers, shapes) must match what it holds, tensor by tensor. Safetensors only; nothing
is ever unpickled.
"""
import json
import math
import os
from dataclasses import dataclass, field

import torch

from .layers import COMPUTE_DTYPES, LayerSpec, TensorSpec
from .numerics import GROUP_SIZE, PRECISIONS

FORMAT_NAME = "comfyui-svdquant"
FORMAT_VERSION = 1

# Tensor-name suffixes that only quantized layers own: one of these outside a declared layer is an error.
QUANTIZED_SUFFIXES = frozenset({"qweight", "wscales", "wzeros", "wtscale", "smooth", "lora_down", "lora_up"})

_DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_LAYER_KEYS = {"kind", "in_features", "out_features", "bias", "rank", "act_unsigned", "rows", "cols"}


class CheckpointError(ValueError):
    """A file that is not a valid checkpoint of this format; the message says what to do."""


@dataclass
class CheckpointInfo:
    """Everything a file's metadata declares."""

    precision: str  # "int4" or "nvfp4": the W4A4 layers' format
    rank: int  # the low-rank branch's rank; a layer entry may override it
    dtype: torch.dtype  # bfloat16 or float16: 16-bit tensors (scales, low-rank, smooth, bias)
    model_family: str  # e.g. "flux.1"
    model_config: dict = field(default_factory=dict)  # the family's constructor arguments
    layers: dict = field(default_factory=dict)  # name -> LayerSpec
    format_version: int = FORMAT_VERSION

    @property
    def group_size(self) -> int:
        return GROUP_SIZE[self.precision]

    def to_metadata(self) -> dict:
        def entry(spec):
            e = {"kind": spec.kind, "in_features": spec.in_features, "out_features": spec.out_features,
                 "bias": spec.bias}
            if spec.kind == "w4a4":
                e["rank"] = spec.rank
                e["act_unsigned"] = spec.act_unsigned
            if spec.part:
                e[spec.part[0]] = list(spec.part[1:])
            return e

        return {
            "format": FORMAT_NAME,
            "format_version": str(self.format_version),
            "precision": self.precision,
            "group_size": str(self.group_size),
            "rank": str(self.rank),
            "dtype": next(k for k, v in _DTYPE_NAMES.items() if v == self.dtype),
            "model_family": self.model_family,
            "model_config": json.dumps(self.model_config, sort_keys=True),
            "layers": json.dumps({name: entry(s) for name, s in sorted(self.layers.items())}),
        }

    def modules(self) -> dict:
        """Model linear name -> {part name: LayerSpec}; a whole layer is the single part ""."""
        modules = {}
        for name, spec in self.layers.items():
            module, part = name.rpartition(".")[::2] if spec.part else (name, "")
            modules.setdefault(module, {})[part] = spec
        return modules

    def expected_tensors(self) -> dict:
        """Full tensor name -> TensorSpec for every tensor the declared layers own."""
        return {f"{name}.{suffix}": t for name, spec in self.layers.items()
                for suffix, t in spec.tensor_specs(self.precision, self.dtype).items()}


def _fail(path, message):
    raise CheckpointError(f"{path}: {message}")


def _metadata_int(path, meta, key):
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        _fail(path, f"metadata '{key}' must be an integer, got {meta.get(key)!r}")


def _metadata_json(path, meta, key):
    try:
        value = json.loads(meta[key])
    except (KeyError, ValueError):
        _fail(path, f"metadata '{key}' must be a JSON object, got {meta.get(key)!r}")
    if not isinstance(value, dict):
        _fail(path, f"metadata '{key}' must be a JSON object, got {type(value).__name__}")
    return value


def _parse_layer(path, name, entry, rank):
    if not isinstance(entry, dict):
        _fail(path, f"layer '{name}' in metadata 'layers' must be a JSON object")
    unknown = set(entry) - _LAYER_KEYS
    if unknown:
        _fail(path, f"layer '{name}' has unknown keys {sorted(unknown)}; allowed: {sorted(_LAYER_KEYS)}")
    types = {"kind": str, "in_features": int, "out_features": int, "bias": bool, "rank": int, "act_unsigned": bool}
    for key, typ in types.items():
        required = key in ("kind", "in_features", "out_features", "bias")
        if key not in entry:
            if required:
                _fail(path, f"layer '{name}' lacks '{key}'")
            continue
        value = entry[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            _fail(path, f"layer '{name}': '{key}' must be {typ.__name__}, got {value!r}")
    if entry["in_features"] <= 0 or entry["out_features"] <= 0:
        _fail(path, f"layer '{name}': in_features and out_features must be positive")
    if entry["kind"] == "w4a16" and ("rank" in entry or "act_unsigned" in entry):
        _fail(path, f"layer '{name}': a w4a16 layer has no 'rank' or 'act_unsigned'")
    part = ()
    if "rows" in entry or "cols" in entry:
        if "rows" in entry and "cols" in entry:
            _fail(path, f"layer '{name}': a part splits 'rows' or 'cols', not both")
        mode = "rows" if "rows" in entry else "cols"
        span = entry[mode]
        if not (isinstance(span, list) and len(span) == 2 and all(type(v) is int for v in span)
                and 0 <= span[0] < span[1]):
            _fail(path, f"layer '{name}': '{mode}' must be [start, stop] with 0 <= start < stop, got {span!r}")
        if "." not in name:
            _fail(path, f"layer '{name}': a part's name must be '<linear>.<part>'")
        if span[1] - span[0] != entry["out_features" if mode == "rows" else "in_features"]:
            _fail(path, f"layer '{name}': '{mode}' {span} does not span its "
                        f"{'out_features' if mode == 'rows' else 'in_features'}")
        part = (mode, *span)
    return LayerSpec(entry["kind"], entry["in_features"], entry["out_features"], entry["bias"],
                     entry.get("rank", rank) if entry["kind"] == "w4a4" else 0,
                     entry.get("act_unsigned", False), part)


def _check_split_linears(path, info):
    """The parts of each split linear must all split the same way and tile it exactly."""
    for module, parts in info.modules().items():
        if "" in parts:
            if len(parts) > 1:
                _fail(path, f"'{module}' is declared both whole and split into parts")
            continue
        mode = {spec.part[0] for spec in parts.values()}
        if len(mode) > 1:
            _fail(path, f"the parts of '{module}' mix 'rows' and 'cols'")
        mode = mode.pop()
        shared = "in_features" if mode == "rows" else "out_features"
        if len({getattr(spec, shared) for spec in parts.values()}) > 1:
            _fail(path, f"the parts of '{module}' split {mode} but differ in {shared}")
        end = 0
        for name, spec in sorted(parts.items(), key=lambda p: p[1].part[1]):
            if spec.part[1] != end:
                _fail(path, f"the parts of '{module}' do not tile its {mode}: '{module}.{name}' starts at "
                            f"{spec.part[1]}, expected {end}")
            end = spec.part[2]


def info_from_metadata(path, meta: dict) -> CheckpointInfo:
    if meta.get("format") != FORMAT_NAME:
        hint = ""
        if "quantization_config" in meta or "model_class" in meta:
            hint = " It looks like a Nunchaku checkpoint: read it with nunchaku_ext.nunchaku_import.import_nunchaku."
        _fail(path, f"not a ComfyUI-SVDQuant checkpoint: its metadata has no 'format' = '{FORMAT_NAME}'.{hint}")
    version = _metadata_int(path, meta, "format_version")
    if version != FORMAT_VERSION:
        newer = " It was written by a newer ComfyUI-SVDQuant: update this node pack." if version > FORMAT_VERSION else ""
        _fail(path, f"format_version {version} is not supported (this version reads {FORMAT_VERSION}).{newer}")
    precision = meta.get("precision")
    if precision not in PRECISIONS:
        _fail(path, f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    group = _metadata_int(path, meta, "group_size")
    if group != GROUP_SIZE[precision]:
        _fail(path, f"group_size {group} does not match precision {precision} (which uses {GROUP_SIZE[precision]})")
    rank = _metadata_int(path, meta, "rank")
    if rank < 0:
        _fail(path, f"rank must be >= 0, got {rank}")
    if meta.get("dtype") not in _DTYPE_NAMES:
        _fail(path, f"unknown dtype {meta.get('dtype')!r}; known: {', '.join(_DTYPE_NAMES)}")
    family = meta.get("model_family")
    if not family:
        _fail(path, "metadata 'model_family' is missing")
    info = CheckpointInfo(precision, rank, _DTYPE_NAMES[meta["dtype"]], family,
                          _metadata_json(path, meta, "model_config"), {}, version)
    for name, entry in _metadata_json(path, meta, "layers").items():
        spec = _parse_layer(path, name, entry, rank)
        try:
            spec.tensor_specs(precision, info.dtype)
        except ValueError as e:
            _fail(path, f"layer '{name}': {e}")
        info.layers[name] = spec
    _check_split_linears(path, info)
    return info


def _describe(t: TensorSpec) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def check_tensors(path, info: CheckpointInfo, tensors: dict):
    """Check a name -> TensorSpec map against what `info` declares; raise one error listing every problem."""
    expected = info.expected_tensors()
    split = {module for module, parts in info.modules().items() if "" not in parts}
    problems = []
    for name, want in expected.items():
        have = tensors.get(name)
        if have is None:
            problems.append(f"tensor '{name}' is missing (expected {_describe(want)})")
        elif (tuple(have.shape), have.dtype) != (tuple(want.shape), want.dtype):
            problems.append(f"tensor '{name}' is {_describe(have)}, expected {_describe(want)}")
    for name, have in tensors.items():
        if name in expected:
            continue
        owner, _, suffix = name.rpartition(".")
        if owner in info.layers:
            kind = info.layers[owner].kind
            problems.append(f"unexpected tensor '{name}': a {kind} layer owns only "
                            + ", ".join(s.rpartition(".")[2] for s in expected if s.startswith(owner + ".")))
        elif owner in split:
            problems.append(f"unexpected tensor '{name}': '{owner}' is split into quantized parts")
        elif suffix in QUANTIZED_SUFFIXES:
            problems.append(f"unexpected tensor '{name}': '{owner}' is not declared in metadata 'layers'")
        elif not have.dtype.is_floating_point:
            problems.append(f"tensor '{name}' of a dense layer is {_describe(have)}, expected a floating-point dtype")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        _fail(path, "does not match its metadata:\n  " + "\n  ".join(shown))


def read_header(path):
    """Parse a safetensors header without reading tensor data: (metadata dict, name -> TensorSpec).
    Checks that the file is a complete safetensors file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            _fail(path, f"not a safetensors file (only {size} bytes)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER_BYTES):
            _fail(path, f"not a safetensors file, or truncated inside its header (header of {n} bytes, "
                        f"file of {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        _fail(path, "not a safetensors file: its header is not JSON")
    if not isinstance(header, dict):
        _fail(path, "not a safetensors file: its header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    specs, data_end = {}, 0
    for name, entry in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except KeyError as e:
            _fail(path, f"tensor '{name}': unsupported or missing header field ({e})")
        except (TypeError, ValueError):
            _fail(path, f"tensor '{name}': malformed header entry {entry!r}")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0:
            _fail(path, f"tensor '{name}': header gives {end - begin} bytes for {_describe(TensorSpec(shape, dtype))}")
        specs[name] = TensorSpec(shape, dtype)
        data_end = max(data_end, end)
    if size - 8 - n < data_end:
        _fail(path, f"file is truncated: its header describes {data_end} bytes of tensor data, the file holds "
                    f"{size - 8 - n}. Download or copy it again.")
    return meta, specs


def read_info(path) -> CheckpointInfo:
    """Read and validate a checkpoint's header; no tensor data is loaded."""
    meta, specs = read_header(path)
    info = info_from_metadata(path, meta)
    check_tensors(path, info, specs)
    return info


def load_checkpoint(path, device="cpu"):
    """Validate, then load: (CheckpointInfo, name -> tensor)."""
    from safetensors.torch import load_file

    info = read_info(path)
    try:
        tensors = load_file(path, device=str(device))
    except Exception as e:  # safetensors raises its own types for corrupt data
        _fail(path, f"could not be read: {e}")
    return info, tensors


def save_checkpoint(path, info: CheckpointInfo, tensors: dict):
    """Validate, then write atomically (a partial file never takes the final name)."""
    from safetensors.torch import save_file

    if info.dtype not in COMPUTE_DTYPES:
        _fail(path, f"dtype must be one of {COMPUTE_DTYPES}, got {info.dtype}")
    meta = info.to_metadata()
    info_from_metadata(path, meta)  # the metadata we write must be what we read
    check_tensors(path, info, {k: TensorSpec(tuple(t.shape), t.dtype) for k, t in tensors.items()})
    tmp = f"{path}.partial"
    save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, tmp, metadata=meta)
    os.replace(tmp, path)


def layer_tensors(tensors: dict, name: str) -> dict:
    """The tensors a layer owns, by suffix (what its module's load_state_dict takes)."""
    prefix = name + "."
    return {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
