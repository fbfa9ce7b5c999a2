"""Quantized linear layers as torch modules.

Every quantized tensor is a registered buffer in the FILE layout (docs/format.md), so state_dict,
.to(device), memory accounting and ComfyUI's model management see the real 4-bit size. The forward
goes through a backend (nunchaku_ext.backends): 'reference' is the executable spec; the 'cuda'
kernels read these buffers as they are, so a layer holds nothing else.
"""
from dataclasses import dataclass

import torch

from . import backends
from .numerics import GROUP_SIZE, PRECISIONS, W4A16_GROUP, e2m1_to_float, expand_groups, unpack_4bit

COMPUTE_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple
    dtype: torch.dtype


@dataclass(frozen=True)
class LayerSpec:
    """What a file declares about one quantized layer (the `layers` metadata of docs/format.md)."""

    kind: str  # "w4a4" or "w4a16"
    in_features: int
    out_features: int
    bias: bool
    rank: int = 0  # w4a4 only: rows of lora_down
    act_unsigned: bool = False  # w4a4 int4 only
    # A part of a split linear (SplitLinear): ("rows", start, stop) computes those output rows of
    # the module its name's prefix names; ("cols", start, stop) takes those input columns, and the
    # parts' outputs are summed. Empty for a whole layer.
    part: tuple = ()

    def tensor_specs(self, precision: str, dtype: torch.dtype) -> dict:
        """Name suffix -> TensorSpec of every tensor this layer owns. The one schema that both the
        modules and the checkpoint validation use."""
        K, N = self.in_features, self.out_features
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"unsupported dtype {dtype}; use one of {COMPUTE_DTYPES}")
        if self.kind == "w4a4":
            if precision not in PRECISIONS:
                raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
            group = GROUP_SIZE[precision]
            if K % group:
                raise ValueError(f"in_features {K} is not a multiple of the {precision} group size {group}")
            if self.act_unsigned and precision != "int4":
                raise ValueError("unsigned (shifted) input exists for int4 only: E2M1 codes are always signed")
            if self.act_unsigned and not self.bias:
                raise ValueError("an unsigned-input layer needs a bias: it holds the shift's compensation")
            if self.rank < 0:
                raise ValueError(f"rank must be >= 0, got {self.rank}")
            specs = {
                "qweight": TensorSpec((N, K // 2), torch.uint8),
                "wscales": TensorSpec((K // group, N), dtype if precision == "int4" else torch.float8_e4m3fn),
                "smooth": TensorSpec((K,), dtype),
                "lora_down": TensorSpec((self.rank, K), dtype),
                "lora_up": TensorSpec((N, self.rank), dtype),
            }
            if precision == "nvfp4":
                specs["wtscale"] = TensorSpec((), torch.float32)
                # Per output channel, exact in fp32: an imported file's per-channel factors (Nunchaku's
                # wcscales, un-fused smoothing) would lose ~6% to e4m3 if folded into the group scales.
                specs["wcscales"] = TensorSpec((N,), torch.float32)
        elif self.kind == "w4a16":
            if K % W4A16_GROUP:
                raise ValueError(f"in_features {K} is not a multiple of the w4a16 group size {W4A16_GROUP}")
            specs = {
                "qweight": TensorSpec((N, K // 2), torch.uint8),
                "wscales": TensorSpec((K // W4A16_GROUP, N), dtype),
                "wzeros": TensorSpec((K // W4A16_GROUP, N), dtype),
            }
        else:
            raise ValueError(f"unknown layer kind {self.kind!r}; known: w4a4, w4a16")
        if self.bias:
            specs["bias"] = TensorSpec((N,), dtype)
        return specs


class _QuantizedLinear(torch.nn.Module):
    def __init__(self, spec: LayerSpec, precision: str, dtype, device):
        super().__init__()
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self.backend = "reference"
        self.register_buffer("bias", None)
        for name, t in spec.tensor_specs(precision, dtype).items():
            self.register_buffer(name, torch.empty(t.shape, dtype=t.dtype, device=device))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


class SVDQW4A4Linear(_QuantizedLinear):
    """y = Q((x [+ shift]) / smooth) · Q(R)ᵀ + (x · lora_downᵀ) · lora_upᵀ + bias (DESIGN.md §2).

    lora_down already holds L1 / smooth and acts on the raw input, so a LoRA is absorbed by
    appending rows to lora_down and columns to lora_up."""

    def __init__(self, in_features, out_features, rank, *, bias=True, precision="int4", act_unsigned=False,
                 dtype=torch.bfloat16, device=None):
        spec = LayerSpec("w4a4", in_features, out_features, bias, rank, act_unsigned)
        super().__init__(spec, precision, dtype, device)
        self.precision = precision
        self.act_unsigned = act_unsigned

    @property
    def rank(self) -> int:
        return self.lora_down.shape[0]

    @property
    def group_size(self) -> int:
        return GROUP_SIZE[self.precision]

    def spec(self) -> LayerSpec:
        return LayerSpec("w4a4", self.in_features, self.out_features, self.bias is not None, self.rank,
                         self.act_unsigned)

    def dequantized_residual(self) -> torch.Tensor:
        """Q(R) in fp32 [N, K], in the smoothed input space."""
        if self.precision == "int4":
            codes = unpack_4bit(self.qweight, signed=True).float()
            return codes * expand_groups(self.wscales.float().T, self.group_size)
        codes = e2m1_to_float(unpack_4bit(self.qweight, signed=False))
        scales = expand_groups(self.wscales.float().T, self.group_size) * self.wcscales[:, None]
        return codes * scales * self.wtscale

    def dequantize(self) -> torch.Tensor:
        """The dense weight this layer stands for, fp32 [N, K] in input space (quantized residual
        over smooth, plus the low-rank branch). Activation quantization and the unsigned shift's
        bias compensation are not part of it."""
        return (self.dequantized_residual() / self.smooth.float()
                + self.lora_up.float() @ self.lora_down.float())

    def extra_repr(self):
        return (super().extra_repr() + f", rank={self.rank}, precision={self.precision}"
                + (", act_unsigned=True" if self.act_unsigned else ""))

    def forward(self, x):
        return backends.get(self.backend).w4a4_linear(self, x)


class W4A16Linear(_QuantizedLinear):
    """Weight-only INT4 linear (adaLN modulation, M = batch size): w = code * scale + zero."""

    def __init__(self, in_features, out_features, *, bias=True, dtype=torch.bfloat16, device=None):
        super().__init__(LayerSpec("w4a16", in_features, out_features, bias), "int4", dtype, device)

    def spec(self) -> LayerSpec:
        return LayerSpec("w4a16", self.in_features, self.out_features, self.bias is not None)

    def dequantize(self) -> torch.Tensor:
        """The dense weight, fp32 [N, K]."""
        codes = unpack_4bit(self.qweight, signed=False).float()
        scales = expand_groups(self.wscales.float().T, W4A16_GROUP)
        zeros = expand_groups(self.wzeros.float().T, W4A16_GROUP)
        return codes * scales + zeros

    def forward(self, x):
        return backends.get(self.backend).w4a16_linear(self, x)


def make_layer(spec: LayerSpec, precision: str, dtype=torch.bfloat16, device=None, *,
               w4a4_class=None, w4a16_class=None) -> torch.nn.Module:
    """An empty (uninitialized) module for a declared layer; fill it with load_state_dict.
    w4a4_class / w4a16_class: subclasses to build instead (e.g. the LoRA-capable ones)."""
    if spec.kind == "w4a4":
        return (w4a4_class or SVDQW4A4Linear)(spec.in_features, spec.out_features, spec.rank, bias=spec.bias,
                                              precision=precision, act_unsigned=spec.act_unsigned, dtype=dtype,
                                              device=device)
    if spec.kind == "w4a16":
        return (w4a16_class or W4A16Linear)(spec.in_features, spec.out_features, bias=spec.bias, dtype=dtype,
                                            device=device)
    raise ValueError(f"unknown layer kind {spec.kind!r}; known: w4a4, w4a16")


class SplitLinear(torch.nn.Module):
    """One linear of the model computed by several quantized layers, each with its own smoothing
    and format: mode "rows" concatenates the parts' outputs (Nunchaku quantizes a FLUX single
    block's linear1 as attention rows and MLP rows), mode "cols" gives each part its slice of the
    input and sums their outputs (linear2: attention columns, signed; MLP columns, unsigned)."""

    def __init__(self, mode: str, parts: dict):
        """parts: part name -> (start, stop, module), the spans tiling [0, total) in order."""
        super().__init__()
        if mode not in ("rows", "cols"):
            raise ValueError(f"split mode must be 'rows' or 'cols', got {mode!r}")
        self.mode = mode
        self.spans = {}
        for name, (start, stop, module) in sorted(parts.items(), key=lambda p: p[1][0]):
            self.spans[name] = (start, stop)
            self.add_module(name, module)
        first = next(iter(self.children()))
        total = max(stop for _, stop in self.spans.values())
        self.in_features = first.in_features if mode == "rows" else total
        self.out_features = total if mode == "rows" else first.out_features

    def forward(self, x):
        parts = [(self.get_submodule(name), span) for name, span in self.spans.items()]
        if self.mode == "rows":
            return torch.cat([module(x) for module, _ in parts], dim=-1)
        y = sum(module(x[..., start:stop]).float() for module, (start, stop) in parts)
        return y.to(x.dtype)


def make_module(parts: dict, precision: str, dtype=torch.bfloat16, device=None, **classes) -> torch.nn.Module:
    """The module for one linear of the model: parts maps part name -> LayerSpec, with the single
    key "" for a whole layer (CheckpointInfo.modules() gives this map). `classes` as for make_layer."""
    if set(parts) == {""}:
        return make_layer(parts[""], precision, dtype, device, **classes)
    mode = {spec.part[0] for spec in parts.values()}
    if len(mode) != 1:
        raise ValueError(f"parts of one linear must all split rows or all split columns, got {sorted(mode)}")
    return SplitLinear(mode.pop(), {name: (spec.part[1], spec.part[2],
                                           make_layer(spec, precision, dtype, device, **classes))
                                    for name, spec in parts.items()})


# ------------------------------------------------------------------------------------------------
# The MLP pair of a transformer block: fc1 -> GELU(tanh) -> fc2, fused where the backend can

# The layer tensors a fused MLP reads; all must be on the input's device for the fused call.
_MLP_OPERANDS = ("qweight", "wscales", "smooth", "lora_down", "lora_up", "bias", "wtscale", "wcscales")


def _global_module_hooks() -> bool:
    """Whether hooks are registered for every module (torch.nn.modules.module.register_module_*)."""
    m = torch.nn.modules.module
    return bool(getattr(m, "_global_forward_hooks", None) or getattr(m, "_global_forward_pre_hooks", None))


def _has_forward_hooks(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class SVDQMLP(torch.nn.Sequential):
    """fc2(GELU_tanh(fc1(x))): an nn.Sequential whose children are 0 = fc1 (SVDQW4A4Linear),
    1 = nn.GELU(approximate="tanh"), 2 = fc2 (SVDQW4A4Linear) — a drop-in for the Sequential a model
    builds (FLUX's double blocks' img_mlp / txt_mlp), with the same child names, hence the same
    state-dict keys. `replace_mlps` swaps it in for such Sequentials.

    Where the layers' backend fuses the pair — the backend module has `mlp_fusable(fc1, fc2)` and it
    is true (the 'cuda' backend: INT4 layers, fc1 signed, fc2 with FLUX's unsigned GELU input) —
    forward is `backend.mlp_w4a4(fc1, fc2, x)` on the layers' own buffers: fc1's GEMM epilogue does
    the GELU and quantizes fc2's input, so the hidden activation is written once, in 4 bits. The
    result is the two linears' up to the rounding of that hidden activation (tests/test_cuda_mlp.py,
    tests/test_mlp_module.py). The backend is read from the layers on every call, so the module
    follows `layer.backend`.

    Everywhere else it runs its children in order, exactly as the Sequential did: a backend that does
    not fuse (the reference backend has `mlp_w4a4`, the spec, but no `mlp_fusable`), a pair it does
    not fuse (NVFP4, a signed fc2), fc1 and fc2 on different backends, a child replaced by something
    else (or a GELU that is not tanh's), forward hooks on a child or global ones, a per-instance
    `forward` on a layer, or a layer tensor not on x's device. `layer_computes_directly` is where a
    framework adds its own conditions for "calling this layer is just its backend op on its buffers"
    (nodes/ops.py: not while ComfyUI streams the layer's weights in low-VRAM mode).

    Adapters absorbed into the layers' low-rank branch (nunchaku_ext.lora: new lora_down / lora_up
    buffers, a new bias) are seen by both paths: the fused call reads the same buffers.
    """

    def layer_computes_directly(self, layer) -> bool:
        """Whether calling `layer` now would compute exactly its backend's w4a4_linear on its own
        buffers, so that the fused call may stand in for it: no hooks, no per-instance forward."""
        return not (_has_forward_hooks(layer) or "forward" in layer.__dict__)

    def fused_backend(self, x):
        """The backend module that runs this MLP fused on x, or None: the children then run in order."""
        children = self._modules
        if len(children) != 3:
            return None
        fc1, act, fc2 = children.get("0"), children.get("1"), children.get("2")
        if not (isinstance(fc1, SVDQW4A4Linear) and isinstance(fc2, SVDQW4A4Linear)
                and type(act) is torch.nn.GELU and act.approximate == "tanh"):
            return None
        if fc1.backend != fc2.backend:
            return None
        backend = backends.get(fc1.backend)
        fusable = getattr(backend, "mlp_fusable", None)
        if fusable is None or not fusable(fc1, fc2):
            return None
        if _global_module_hooks() or _has_forward_hooks(act):
            return None
        if not (self.layer_computes_directly(fc1) and self.layer_computes_directly(fc2)):
            return None
        for layer in (fc1, fc2):
            for name in _MLP_OPERANDS:
                t = getattr(layer, name, None)
                if t is not None and t.device != x.device:
                    return None
        return backend

    def forward(self, x):
        backend = self.fused_backend(x)
        if backend is None:
            return super().forward(x)
        return backend.mlp_w4a4(self._modules["0"], self._modules["2"], x)


def is_plain_mlp(module) -> bool:
    """Exactly nn.Sequential(fc1, nn.GELU(approximate="tanh"), fc2) with SVDQ W4A4 layers as fc1 and
    fc2 (a subclass of Sequential, or another activation as in FLUX variants' mlp_silu_act, is not)."""
    if type(module) is not torch.nn.Sequential or len(module) != 3:
        return False
    fc1, act, fc2 = module
    return (isinstance(fc1, SVDQW4A4Linear) and isinstance(fc2, SVDQW4A4Linear) and type(act) is torch.nn.GELU
            and act.approximate == "tanh")


def replace_mlps(root: torch.nn.Module, mlp_class=SVDQMLP) -> list:
    """Replace every plain MLP (is_plain_mlp) below `root` by `mlp_class` (SVDQMLP or a subclass)
    holding the same child modules under the same names, so state_dict keys and module names are
    unchanged. -> the replaced modules' names."""
    from collections import OrderedDict

    names = []
    for name, module in list(root.named_modules()):
        if name and is_plain_mlp(module):
            parent, _, child = name.rpartition(".")
            mlp = mlp_class(OrderedDict(module._modules))
            mlp.training = module.training
            setattr(root.get_submodule(parent), child, mlp)
            names.append(name)
    return names
