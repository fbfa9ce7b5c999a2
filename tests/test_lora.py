"""LoRA absorption: a quantized layer with absorbed adapters equals its dense dequantized weight plus
the merged LoRA, for whole layers, for row slices of fused ones (qkv, linear1), and for split
linears (Nunchaku's linear1 as row parts, linear2 as column parts)."""
import pytest
import torch

from nunchaku_ext.layers import SplitLinear, W4A16Linear
from nunchaku_ext.lora import (
    AdapterSet,
    LowRankUpdate,
    SVDQW4A4LinearLoRA,
    W4A16LinearLoRA,
    set_split_adapters,
    stack_split_updates,
    stack_updates,
)
from nunchaku_ext.quantize import quantize_w4a4, quantize_w4a16


def w4a4_lora_layer(N, K, rank, *, precision="int4", act_unsigned=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = quantize_w4a4(torch.randn(N, K, generator=g), torch.randn(N, generator=g), rank,
                          precision=precision, act_unsigned=act_unsigned)
    layer = SVDQW4A4LinearLoRA(K, N, rank, precision=precision, act_unsigned=act_unsigned)
    layer.load_state_dict(dense.state_dict())
    return layer


def random_update(n, K, r, scale, offset=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return LowRankUpdate(torch.randn(n, r, generator=g) * 0.1, torch.randn(r, K, generator=g) * 0.1, scale, offset)


def merged_delta(updates, N, K):
    """The dense merge a LoRA loader would do: ΔW = Σ scale · up @ down in the update's rows (fp64)."""
    delta = torch.zeros(N, K, dtype=torch.float64)
    for u in updates:
        delta[u.row_offset:u.row_offset + u.up.shape[0]] += u.scale * (u.up.double() @ u.down.double())
    return delta


def bf16_merge_tolerance(updates):
    # Factors are stored in bf16 (8 mantissa bits) after the scale is folded into down.
    return sum(abs(u.scale) * (u.up.abs().double() @ u.down.abs().double()).max().item() for u in updates) * 2 ** -7


CASES = {
    # name: (N, K, [(rows, rank, scale, offset)])
    "whole layer": (96, 128, [(96, 4, 0.75, 0)]),
    "qkv q/k/v slices": (3 * 64, 64, [(64, 4, 1.0, 0), (64, 4, -0.5, 64), (64, 8, 2.0, 128)]),
    "linear1 q/k/v/mlp slices": (3 * 64 + 256, 64, [(64, 2, 0.5, 0), (64, 2, 0.5, 64), (64, 2, 0.5, 128),
                                                     (256, 2, 1.5, 192)]),
    "two loras, same rows": (64, 128, [(64, 4, 1.0, 0), (64, 16, 0.3, 0)]),
}


@pytest.mark.parametrize("precision,act_unsigned", [("int4", False), ("int4", True), ("nvfp4", False)])
@pytest.mark.parametrize("case", list(CASES))
def test_absorbed_layer_equals_dense_plus_merged_lora(case, precision, act_unsigned):
    N, K, shapes = CASES[case]
    layer = w4a4_lora_layer(N, K, 8, precision=precision, act_unsigned=act_unsigned)
    base_dense = layer.dequantize().double()
    updates = [random_update(n, K, r, s, off, seed=10 + i) for i, (n, r, s, off) in enumerate(shapes)]
    layer.set_adapters(stack_updates(updates, N, K))

    assert layer.rank == 8 + sum(r for _, r, _, _ in shapes)
    want = base_dense + merged_delta(updates, N, K)
    err = (layer.dequantize().double() - want).abs().max().item()
    assert err <= bf16_merge_tolerance(updates)


@pytest.mark.parametrize("act_unsigned", [False, True])
def test_forward_changes_by_exactly_the_lora_term(act_unsigned):
    """The quantized branch is untouched: output(with LoRA) - output(base) = x · ΔWᵀ (to fp32/bf16 rounding)."""
    N, K = 3 * 64, 128
    layer = w4a4_lora_layer(N, K, 16, act_unsigned=act_unsigned)
    x = torch.randn(5, 7, K, dtype=torch.float32)
    if act_unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    base = layer(x).double()
    updates = [random_update(64, K, 4, 1.0, 64, seed=3), random_update(N, K, 8, 0.5, 0, seed=4)]
    adapters = stack_updates(updates, N, K, dtype=torch.bfloat16)
    layer.set_adapters(adapters)
    got = layer(x).double() - base
    # Reference: the stored (bf16) factors, applied in float64.
    want = (x.double() @ adapters.down.double().T) @ adapters.up.double().T
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    # and the stored factors are the merged LoRA to bf16 precision
    assert (adapters.up.double() @ adapters.down.double() - merged_delta(updates, N, K)).abs().max() <= \
        bf16_merge_tolerance(updates)


def test_replacing_and_removing_adapters_restarts_from_the_base():
    N, K = 64, 128
    layer = w4a4_lora_layer(N, K, 8)
    base = {k: v.clone() for k, v in layer.state_dict().items()}
    a = stack_updates([random_update(N, K, 4, 1.0, seed=5)], N, K)
    b = stack_updates([random_update(N, K, 2, -2.0, seed=6)], N, K)

    layer.set_adapters(a)
    layer.set_adapters(b)
    only_b = w4a4_lora_layer(N, K, 8)
    only_b.set_adapters(b)
    assert torch.equal(layer.lora_down, only_b.lora_down) and torch.equal(layer.lora_up, only_b.lora_up)

    layer.set_adapters(None)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, base[k]), k
    assert layer.rank == layer.base_rank == 8


def test_bias_delta_is_applied_and_removed_exactly():
    N, K = 64, 64
    layer = w4a4_lora_layer(N, K, 4)
    bias = layer.bias.clone()
    delta = torch.randn(N)
    layer.set_adapters(stack_updates([], N, K, bias=delta))
    assert torch.equal(layer.bias, (bias.float() + delta.to(torch.bfloat16).float()).to(torch.bfloat16))
    assert "base_bias" not in layer.state_dict()
    layer.set_adapters(None)
    assert torch.equal(layer.bias, bias)


def test_base_rank_zero_layer_absorbs_a_lora():
    N, K = 64, 64
    layer = w4a4_lora_layer(N, K, 0)
    base_dense = layer.dequantize().double()
    u = random_update(N, K, 4, 1.0)
    layer.set_adapters(stack_updates([u], N, K))
    assert (layer.dequantize().double() - base_dense - merged_delta([u], N, K)).abs().max() <= bf16_merge_tolerance([u])


def test_w4a16_layer_gets_a_branch_for_adapters():
    N, K = 6 * 64, 64
    g = torch.Generator().manual_seed(0)
    dense = quantize_w4a16(torch.randn(N, K, generator=g), torch.randn(N, generator=g))
    layer = W4A16LinearLoRA(K, N)
    layer.load_state_dict(dense.state_dict())
    assert set(layer.state_dict()) == set(dense.state_dict())  # the empty branch is not file state
    x = torch.randn(2, 1, K)
    assert torch.equal(layer(x), dense(x))

    u = random_update(N, K, 4, 0.8, seed=7)
    adapters = stack_updates([u], N, K)
    layer.set_adapters(adapters)
    want = (x.double() @ W4A16Linear.dequantize(layer).double().T + layer.bias.double()
            + x.double() @ (adapters.up.double() @ adapters.down.double()).T)
    assert torch.allclose(layer(x).double(), want, atol=1e-4, rtol=1e-4)
    layer.set_adapters(None)
    assert torch.equal(layer(x), dense(x))


def test_stack_updates_rejects_mismatched_factors_and_rows():
    with pytest.raises(ValueError, match="down is"):
        stack_updates([LowRankUpdate(torch.zeros(8, 2), torch.zeros(3, 16), 1.0)], 8, 16)
    with pytest.raises(ValueError, match="outside"):
        stack_updates([LowRankUpdate(torch.zeros(8, 2), torch.zeros(2, 16), 1.0, row_offset=4)], 8, 16)
    with pytest.raises(ValueError, match="bias delta"):
        stack_updates([], 8, 16, bias=torch.zeros(4))


def test_bias_patch_on_a_layer_without_bias_is_refused():
    layer = SVDQW4A4LinearLoRA(64, 64, 4, bias=False)
    with pytest.raises(ValueError, match="no bias"):
        layer.set_adapters(AdapterSet(torch.zeros(0, 64, dtype=torch.bfloat16),
                                      torch.zeros(64, 0, dtype=torch.bfloat16), torch.zeros(64)))


# Split linears shaped like a single block's (h = 64, m = 128): linear1 = rows [qkv 3h | mlp m],
# linear2 = cols [attention h, signed | mlp m, unsigned]. (part name, span, act_unsigned)
SPLITS = {
    "rows": [("qkv_proj", (0, 192), False), ("mlp_fc1", (192, 320), False)],
    "cols": [("out_proj", (0, 64), False), ("mlp_fc2", (64, 192), True)],
}
SPLIT_UPDATES = {  # mode -> [(rows, rank, scale, offset)] on the whole linear
    # the whole linear (across both parts), q alone, the MLP rows, and rows straddling the boundary
    "rows": [(320, 4, 0.75, 0), (64, 2, 1.0, 0), (128, 4, -0.5, 192), (64, 2, 2.0, 160)],
    "cols": [(64, 4, 0.75, 0), (32, 2, -1.5, 16)],
}


def split_linear(mode, rank=8, seed=0):
    """(SplitLinear of LoRA-capable parts, its dense weight [N, K] and bias [N] before quantization)."""
    g = torch.Generator().manual_seed(seed)
    spans = SPLITS[mode]
    other = 64  # in_features of rows parts, out_features of cols parts
    total = spans[-1][1][1]
    dense_w = torch.randn((total, other) if mode == "rows" else (other, total), generator=g)
    dense_b = torch.randn(total if mode == "rows" else other, generator=g)
    parts = {}
    for i, (name, (start, stop), unsigned) in enumerate(spans):
        w = dense_w[start:stop] if mode == "rows" else dense_w[:, start:stop]
        # cols: the parts' biases add up to the linear's; the first part holds it
        b = dense_b[start:stop] if mode == "rows" else (dense_b if i == 0 else None)
        q = quantize_w4a4(w, b, rank, act_unsigned=unsigned)
        layer = SVDQW4A4LinearLoRA(w.shape[1], w.shape[0], rank, bias=q.bias is not None, act_unsigned=unsigned)
        layer.load_state_dict(q.state_dict())
        parts[name] = (start, stop, layer)
    return SplitLinear(mode, parts)


def split_dense(split):
    """The dense weight a split linear stands for, fp64 [N, K]: its parts' dequantized weights joined."""
    weights = [split.get_submodule(name).dequantize().double() for name in split.spans]
    return torch.cat(weights, dim=0 if split.mode == "rows" else 1)


@pytest.mark.parametrize("mode", list(SPLITS))
def test_split_linear_with_absorbed_lora_equals_dense_plus_merged_lora(mode):
    split = split_linear(mode)
    N, K = split.out_features, split.in_features
    base_dense = split_dense(split)
    updates = [random_update(n, K, r, s, off, seed=20 + i) for i, (n, r, s, off) in enumerate(SPLIT_UPDATES[mode])]
    set_split_adapters(split, stack_split_updates(split, updates))

    delta = merged_delta(updates, N, K)
    assert delta.abs().max() > 20 * bf16_merge_tolerance(updates)  # the LoRA is far above the tolerance
    err = (split_dense(split) - base_dense - delta).abs().max().item()
    assert err <= bf16_merge_tolerance(updates)
    # a rows part holds only the ranks of the updates that reach its rows
    if mode == "rows":
        assert split.qkv_proj.rank - 8 == 4 + 2 + 2 and split.mlp_fc1.rank - 8 == 4 + 4 + 2

    set_split_adapters(split, None)
    assert torch.equal(split_dense(split), base_dense)


@pytest.mark.parametrize("mode", list(SPLITS))
def test_split_linear_forward_changes_by_the_lora_and_bias_delta(mode):
    split = split_linear(mode)
    N, K = split.out_features, split.in_features
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, K, generator=g)
    if mode == "cols":  # the MLP part's input is a GELU output, as in linear2
        x[..., 64:] = torch.nn.functional.gelu(x[..., 64:], approximate="tanh")
    base = split(x).double()
    updates = [random_update(n, K, r, s, off, seed=30 + i) for i, (n, r, s, off) in enumerate(SPLIT_UPDATES[mode])]
    bias = torch.randn(N, generator=g)
    set_split_adapters(split, stack_split_updates(split, updates, bias=bias))

    want = x.double() @ merged_delta(updates, N, K).T + bias.double()
    got = split(x).double() - base
    assert want.abs().max() > 1.0
    # bf16 factors and bias (8 significant bits), on outputs of magnitude ~ want's
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    if mode == "cols":  # the bias delta went to one part only
        assert "base_bias" in split.out_proj._buffers and "base_bias" not in split.mlp_fc2._buffers

    set_split_adapters(split, None)
    assert torch.equal(split(x).double(), base)


def test_split_updates_reject_factors_that_do_not_fit_the_linear():
    split = split_linear("cols")
    with pytest.raises(ValueError, match="down is"):
        stack_split_updates(split, [LowRankUpdate(torch.zeros(64, 2), torch.zeros(2, 64), 1.0)])
    with pytest.raises(ValueError, match="outside"):
        stack_split_updates(split, [LowRankUpdate(torch.zeros(64, 2), torch.zeros(2, 192), 1.0, row_offset=8)])
    with pytest.raises(ValueError, match="bias delta"):
        stack_split_updates(split, [], bias=torch.zeros(192))
