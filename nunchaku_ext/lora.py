"""LoRA absorption: low-rank adapters become extra rank of a quantized layer's low-rank branch.

A W4A4 layer computes ... + (x · Dᵀ) · Uᵀ with D = lora_down [r, K] acting on the raw input, so a
LoRA update ΔW = s · B · A (B [n, r'], A [r', K], s = strength · alpha / r') is absorbed exactly by

    D ← [D; s · A]        U ← [U, B]

with no re-quantization. A LoRA on a row slice of a fused linear (q, k or v of a fused qkv; the
MLP input of a single block's linear1) puts B into rows [offset, offset + n) of the new columns of
U and zeros elsewhere. W4A16 layers have no branch of their own, so they get one that is empty
until a LoRA arrives.

The base branch is the first `base_rank` rows of D / columns of U, so installing a new set of
adapters, or none, never accumulates rounding: it always starts again from the base.

A split linear (layers.SplitLinear: parts computing row blocks, or column blocks whose outputs are
summed) takes the updates meant for the whole linear, divided exactly: a rows part gets the rows
of B (and of a bias delta) that fall in its span, with the whole A; a cols part gets the whole B
and the columns of A in its span, and one part alone gets the bias delta (the parts' biases add).
"""
from dataclasses import dataclass

import torch

from .layers import LayerSpec, SplitLinear, SVDQW4A4Linear, W4A16Linear, make_layer


@dataclass(frozen=True)
class LowRankUpdate:
    """ΔW[offset : offset + n, :] += scale · up @ down, for up [n, r] and down [r, K]."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float
    row_offset: int = 0


@dataclass(frozen=True)
class AdapterSet:
    """What the adapters of one patch set add to one layer: extra branch factors (down [R, K] with
    the scales folded in, up [N, R]) and a bias delta [N] (or None)."""

    down: torch.Tensor
    up: torch.Tensor
    bias: torch.Tensor = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def stack_updates(updates, out_features, in_features, *, bias=None, dtype=torch.bfloat16, device=None) -> AdapterSet:
    """Stack updates into one extra branch. Factors are combined in fp32 and stored in `dtype`."""
    downs, ups = [], []
    for i, u in enumerate(updates):
        n, r = u.up.shape
        if u.down.shape != (r, in_features):
            raise ValueError(f"update {i}: down is {tuple(u.down.shape)}, expected ({r}, {in_features}) "
                             f"to match up {tuple(u.up.shape)}")
        if not 0 <= u.row_offset <= out_features - n:
            raise ValueError(f"update {i}: rows [{u.row_offset}, {u.row_offset + n}) are outside the layer's "
                             f"{out_features} output features")
        downs.append(u.down.to(device, torch.float32) * u.scale)
        up = torch.zeros(out_features, r, dtype=torch.float32, device=device)
        up[u.row_offset:u.row_offset + n] = u.up.to(device, torch.float32)
        ups.append(up)
    down = torch.cat(downs) if downs else torch.zeros(0, in_features, device=device)
    up = torch.cat(ups, dim=1) if ups else torch.zeros(out_features, 0, device=device)
    if bias is not None:
        if bias.shape != (out_features,):
            raise ValueError(f"bias delta is {tuple(bias.shape)}, expected ({out_features},)")
        bias = bias.to(device, dtype)
    return AdapterSet(down.to(dtype), up.to(dtype), bias)


def stack_split_updates(split: SplitLinear, updates, *, bias=None, dtype=torch.bfloat16, device=None) -> dict:
    """Updates and a bias delta [N] (or None) for the whole linear that `split` computes -> part
    name -> AdapterSet, for set_split_adapters. A part that no update reaches gets an empty branch."""
    for i, u in enumerate(updates):
        n, r = u.up.shape
        if u.down.shape != (r, split.in_features):
            raise ValueError(f"update {i}: down is {tuple(u.down.shape)}, expected ({r}, {split.in_features}) "
                             f"to match up {tuple(u.up.shape)}")
        if not 0 <= u.row_offset <= split.out_features - n:
            raise ValueError(f"update {i}: rows [{u.row_offset}, {u.row_offset + n}) are outside the linear's "
                             f"{split.out_features} output features")
    if bias is not None and bias.shape != (split.out_features,):
        raise ValueError(f"bias delta is {tuple(bias.shape)}, expected ({split.out_features},)")
    if split.mode == "cols" and bias is not None:
        with_bias = [name for name in split.spans if split.get_submodule(name).bias is not None]
        if not with_bias:
            raise ValueError("no part of this split linear has a bias, so a bias patch cannot be applied to it")
        bias_part = with_bias[0]
    adapters = {}
    for name, (start, stop) in split.spans.items():
        part = split.get_submodule(name)
        if split.mode == "rows":
            part_updates = []
            for u in updates:
                first, last = max(u.row_offset, start), min(u.row_offset + u.up.shape[0], stop)
                if first < last:
                    up = u.up[first - u.row_offset:last - u.row_offset]
                    part_updates.append(LowRankUpdate(up, u.down, u.scale, first - start))
            part_bias = None if bias is None else bias[start:stop]
        else:
            part_updates = [LowRankUpdate(u.up, u.down[:, start:stop], u.scale, u.row_offset) for u in updates]
            part_bias = bias if bias is not None and name == bias_part else None
        adapters[name] = stack_updates(part_updates, part.out_features, part.in_features, bias=part_bias,
                                       dtype=dtype, device=device)
    return adapters


def set_split_adapters(split: SplitLinear, adapters: dict = None):
    """Install stack_split_updates' result on the parts of `split` (None: every part's base branch)."""
    for name in split.spans:
        split.get_submodule(name).set_adapters(None if adapters is None else adapters[name])


class _AdapterHost:
    """Shared by the LoRA-capable layers: installs an AdapterSet, always relative to the base."""

    def _keep_base_bias(self):
        # The base bias is kept aside only once a bias delta is installed (non-persistent: it moves
        # with the module but is not part of its state dict).
        if self.bias is not None and "base_bias" not in self._buffers:
            self.register_buffer("base_bias", self.bias.clone(), persistent=False)

    def _install_bias(self, delta):
        if delta is None:
            if "base_bias" in self._buffers:
                self.bias = self._buffers.pop("base_bias")
            return
        if self.bias is None:
            raise ValueError("this layer has no bias, so a bias patch cannot be applied to it")
        self._keep_base_bias()
        self.bias = (self.base_bias.float() + delta.to(self.base_bias.device).float()).to(self.base_bias.dtype)


class SVDQW4A4LinearLoRA(SVDQW4A4Linear, _AdapterHost):
    """An SVDQ W4A4 layer whose low-rank branch can be extended by adapters (and reset)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.base_rank = self.rank

    def set_adapters(self, adapters: AdapterSet = None):
        """Branch = base branch + `adapters` (None: the base branch alone)."""
        device = self.lora_down.device
        down, up = self.lora_down[:self.base_rank], self.lora_up[:, :self.base_rank]
        if adapters is None or adapters.rank == 0:
            self.lora_down, self.lora_up = down.clone(), up.clone()
        else:
            self.lora_down = torch.cat([down, adapters.down.to(device, down.dtype)])
            self.lora_up = torch.cat([up, adapters.up.to(device, up.dtype)], dim=1)
        self._install_bias(None if adapters is None else adapters.bias)

    def extra_repr(self):
        return super().extra_repr() + (f", adapter_rank={self.rank - self.base_rank}" if self.rank > self.base_rank else "")


class W4A16LinearLoRA(W4A16Linear, _AdapterHost):
    """A W4A16 layer plus a low-rank branch on its input that is empty until adapters are set."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        dtype, device = self.wscales.dtype, self.wscales.device
        if device.type == "meta":  # built to be loaded with assign=True: an empty tensor must stay movable
            device = torch.device("cpu")
        # Not persistent: adapters are run-time state, the file holds no branch for this layer.
        self.register_buffer("lora_down", torch.zeros(0, self.in_features, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("lora_up", torch.zeros(self.out_features, 0, dtype=dtype, device=device),
                             persistent=False)

    @property
    def rank(self) -> int:
        return self.lora_down.shape[0]

    def set_adapters(self, adapters: AdapterSet = None):
        device, dtype = self.wscales.device, self.wscales.dtype
        if adapters is None or adapters.rank == 0:
            self.lora_down = torch.zeros(0, self.in_features, dtype=dtype, device=device)
            self.lora_up = torch.zeros(self.out_features, 0, dtype=dtype, device=device)
        else:
            self.lora_down, self.lora_up = adapters.down.to(device, dtype), adapters.up.to(device, dtype)
        self._install_bias(None if adapters is None else adapters.bias)

    def forward(self, x):
        y = super().forward(x)
        if self.rank:
            y = y + ((x.float() @ self.lora_down.float().T) @ self.lora_up.float().T).to(y.dtype)
        return y


def make_lora_layer(spec: LayerSpec, precision: str, dtype=torch.bfloat16, device=None) -> torch.nn.Module:
    """Like nunchaku_ext.layers.make_layer, for layers that accept adapters."""
    return make_layer(spec, precision, dtype, device, w4a4_class=SVDQW4A4LinearLoRA, w4a16_class=W4A16LinearLoRA)
