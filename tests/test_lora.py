"""LoRA absorption: a quantized layer with absorbed adapters equals its dense dequantized weight plus
the merged LoRA, for whole layers and for row slices of fused ones (qkv, linear1)."""
import pytest
import torch

from nunchaku_ext.layers import W4A16Linear
from nunchaku_ext.lora import (
    AdapterSet,
    LowRankUpdate,
    SVDQW4A4LinearLoRA,
    W4A16LinearLoRA,
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
