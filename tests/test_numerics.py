"""Packing round trips, quantization error bounds and rounding rules of nunchaku_ext.numerics."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nunchaku_ext import numerics as nx

shapes = st.tuples(st.integers(1, 5), st.integers(1, 40)).map(lambda s: (s[0], 2 * s[1]))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), signed=st.booleans())
def test_pack_unpack_round_trip(shape, seed, signed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = torch.randint(lo, hi, shape, generator=g, dtype=torch.int8 if signed else torch.uint8)
    packed = nx.pack_4bit(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], shape[1] // 2)
    assert torch.equal(nx.unpack_4bit(packed, signed=signed), codes)


def test_pack_layout_low_nibble_is_even_index():
    # codes 1, -2, 7, -8 -> bytes 0xE1 (low 1, high 0xE = -2), 0x87 (low 7, high 0x8 = -8)
    packed = nx.pack_4bit(torch.tensor([1, -2, 7, -8], dtype=torch.int8))
    assert packed.tolist() == [0xE1, 0x87]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="even"):
        nx.pack_4bit(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(TypeError):
        nx.pack_4bit(torch.zeros(4))
    with pytest.raises(TypeError):
        nx.unpack_4bit(torch.zeros(4, dtype=torch.int8), signed=True)


def _random_groups(seed, rows, groups, group, outliers=True):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(rows, groups * group, generator=g)
    if outliers:
        v *= torch.rand(rows, groups * group, generator=g).pow(8) * 50 + 1
    v[0, :group] = 0  # an all-zero group
    return v


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 6), groups=st.integers(1, 4))
def test_int4_signed_error_bound(seed, rows, groups):
    v = _random_groups(seed, rows, groups, 64)
    codes, scales = nx.quantize_act_int4(v)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32
    assert scales.shape == (rows, groups) and int(codes.abs().max()) <= 7
    s = nx.expand_groups(scales, 64)
    assert bool(((codes.float() * s - v).abs() <= s / 2 * (1 + 1e-6)).all())
    assert torch.equal(scales, v.unflatten(-1, (groups, 64)).abs().amax(-1) / 7)
    assert bool((codes[0, :64] == 0).all()) and scales[0, 0] == 0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 6), groups=st.integers(1, 4))
def test_int4_unsigned_error_bound(seed, rows, groups):
    v = _random_groups(seed, rows, groups, 64).abs()
    v[-1, -1] = -1e-3  # rounding can leave a tiny negative after the shift: it becomes code 0
    codes, scales = nx.quantize_act_int4(v, unsigned=True)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    s = nx.expand_groups(scales, 64)
    err = (codes.float() * s - v.clamp_min(0)).abs()
    assert bool((err <= s / 2 * (1 + 1e-6)).all())
    assert codes[-1, -1] == 0


def test_int4_rounds_half_to_even():
    v = torch.zeros(1, 64)
    v[0, :6] = torch.tensor([7.0, 2.5, 3.5, -2.5, 0.5, 1.5])  # absmax 7 -> scale exactly 1
    codes, scales = nx.quantize_act_int4(v)
    assert scales.item() == 1.0
    assert codes[0, :6].tolist() == [7, 2, 4, -2, 0, 2]


def _e2m1_nearest_even(x: float) -> float:
    """Brute force: nearest E2M1 value, ties to the code with an even mantissa bit (even index)."""
    mags = nx.E2M1_MAGNITUDES
    m = min(abs(x), 6.0)
    best = min(range(8), key=lambda i: (abs(mags[i] - m), i % 2))
    return float(np.copysign(mags[best], x)) if best else 0.0


def test_e2m1_rounding_matches_brute_force():
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    grid = sorted(set(np.linspace(-8, 8, 3201).tolist() + mids + [-m for m in mids]
                      + list(nx.E2M1_MAGNITUDES) + [7.0, 100.0, -100.0]))
    v = torch.tensor(grid, dtype=torch.float32)
    got = nx.e2m1_to_float(nx.round_to_e2m1(v))
    want = torch.tensor([_e2m1_nearest_even(x) for x in grid])
    assert torch.equal(got, want)
    # a code never encodes negative zero
    assert int(nx.round_to_e2m1(torch.tensor([-0.1, -0.0])).max()) == 0


def test_e2m1_codes_round_trip():
    codes = torch.tensor([c for c in range(16) if c != 8], dtype=torch.uint8)
    assert torch.equal(nx.round_to_e2m1(nx.e2m1_to_float(codes)), codes)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 6), groups=st.integers(1, 8))
def test_nvfp4_activation_error_bound(seed, rows, groups):
    v = _random_groups(seed, rows, groups, 16)
    codes, scales = nx.quantize_act_nvfp4(v)
    assert codes.dtype == torch.uint8 and scales.dtype == torch.float8_e4m3fn
    assert scales.shape == (rows, groups)
    s = nx.expand_groups(scales.float(), 16)
    err = (nx.e2m1_to_float(codes) * s - v).abs()
    # E2M1 spacing is 0.5 below 2, then a quarter of the magnitude at most; the e4m3 scale's own
    # rounding (2^-4 relative) can push the top value past 6, where it saturates.
    bound = torch.maximum(0.25 * s, 0.25 * v.abs()) * (1 + 1e-6) + 0.07 * s
    assert bool((err <= bound).all())
    assert bool((codes[0, :16] == 0).all())


def test_nvfp4_activation_scale_saturates_at_e4m3_max():
    v = torch.full((1, 16), 1e5)
    codes, scales = nx.quantize_act_nvfp4(v)
    assert scales.float().item() == 448.0 and bool((nx.e2m1_to_float(codes) == 6).all())


def test_nvfp4_weight_quantization():
    v = _random_groups(3, 8, 4, 16)
    codes, scales, alpha = nx.quantize_weight_nvfp4(v)
    assert alpha.dtype == torch.float32 and alpha.dim() == 0
    assert float(scales.float().max()) <= 448
    deq = nx.e2m1_to_float(codes) * nx.expand_groups(scales.float(), 16) * alpha
    s = nx.expand_groups(scales.float(), 16) * alpha
    assert bool(((deq - v).abs() <= torch.maximum(0.25 * s, 0.25 * v.abs()) + 0.07 * s + 1e-6).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w4a16_error_bound(dtype):
    for seed in range(5):
        w = _random_groups(seed, 7, 3, 64)
        codes, scales, zeros = nx.quantize_weight_w4a16(w, dtype)
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
        assert scales.dtype == dtype and zeros.dtype == dtype and scales.shape == (7, 3)
        s = nx.expand_groups(scales.float(), 64)
        deq = codes.float() * s + nx.expand_groups(zeros.float(), 64)
        # half a step, plus what rounding scale and zero to 16 bits can shift (zero: 2^-8 relative,
        # scale: 15 steps of 2^-8 relative)
        groups = w.unflatten(-1, (3, 64))
        extent = nx.expand_groups(torch.maximum(groups.amin(-1).abs(), groups.amax(-1).abs()), 64)
        assert bool(((deq - w).abs() <= 0.5 * s + 2**-7 * extent + 15 * 2**-8 * s).all())


def test_smooth_input_is_fp32_division():
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    smooth = torch.rand(64, dtype=torch.bfloat16) + 0.5
    for unsigned in (False, True):
        xs = nx.smooth_input(x, smooth, unsigned)
        want = (x.float() + (0.171875 if unsigned else 0.0)) / smooth.float()
        assert xs.dtype == torch.float32 and torch.equal(xs, want)
