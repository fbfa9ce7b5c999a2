"""The minimal quantizer: SVD low-rank branch, smoothing, residual quantization, shift compensation."""
import pytest
import torch

from nunchaku_ext.numerics import UNSIGNED_SHIFT
from nunchaku_ext.quantize import quantize_w4a4, quantize_w4a16


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_low_rank_branch_absorbs_low_rank_structure(precision):
    g = torch.Generator().manual_seed(0)
    # a weight dominated by a rank-8 part with large outlier columns, plus small noise
    low = torch.randn(96, 8, generator=g) @ torch.randn(8, 256, generator=g) * 5
    w = low + 0.05 * torch.randn(96, 256, generator=g)
    err = {r: rel(quantize_w4a4(w, None, r, precision=precision).dequantize(), w) for r in (0, 8, 16)}
    assert err[8] < err[0] / 10  # the branch took the rank-8 part; only the noise is quantized
    assert err[16] <= err[8] * 1.1
    layer = quantize_w4a4(w, None, 8, precision=precision)
    u = layer.lora_up.float() @ layer.lora_down.float()
    assert rel(u, low) < 0.01  # lora_up · lora_down is the top-8 SVD part


def test_smoothing_moves_activation_outliers_into_weights():
    g = torch.Generator().manual_seed(1)
    K = 256
    w = torch.randn(64, K, generator=g)
    channel_scale = torch.ones(K)
    channel_scale[::16] = 60.0  # outlier input channels
    x = torch.randn(32, K, generator=g) * channel_scale
    dense = x @ w.T
    plain = rel(quantize_w4a4(w, None, 16)(x), dense)
    smooth = channel_scale.sqrt()  # migrate half the outlier magnitude (alpha = 0.5)
    smoothed = rel(quantize_w4a4(w, None, 16, smooth=smooth)(x), dense)
    assert smoothed < 0.7 * plain
    layer = quantize_w4a4(w, None, 16, smooth=smooth)
    assert rel(layer.dequantize(), w) < 0.15  # dequantize() is back in input space


def test_unsigned_layer_compensates_the_shift():
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(48, 128, generator=g), torch.randn(48, generator=g)
    h = torch.nn.functional.gelu(torch.randn(20, 128, generator=g) * 2, approximate="tanh")
    dense = h @ w.T + b
    signed = quantize_w4a4(w, b, 8, dtype=torch.float16)
    unsigned = quantize_w4a4(w, b, 8, act_unsigned=True, dtype=torch.float16)
    e_signed, e_unsigned = rel(signed(h), dense), rel(unsigned(h), dense)
    assert e_unsigned < 0.2 and e_unsigned < 1.5 * e_signed
    # the stored bias is b minus exactly shift · Σ_k Q(R)[n, k] / smooth[k]
    comp = UNSIGNED_SHIFT * (unsigned.dequantized_residual() / unsigned.smooth.float()).sum(1)
    assert torch.allclose(unsigned.bias.float(), (b - comp).half().float())
    # without a bias argument an unsigned layer still gets one, holding the compensation
    assert quantize_w4a4(w, None, 8, act_unsigned=True).bias is not None


def test_w4a16_quantizer():
    w = torch.randn(40, 128)
    layer = quantize_w4a16(w)
    assert rel(layer.dequantize(), w) < 0.12 and layer.bias is None


def test_quantizer_rejects_bad_arguments():
    w = torch.randn(16, 64)
    with pytest.raises(ValueError, match="rank must be in"):
        quantize_w4a4(w, None, 17)
    with pytest.raises(ValueError, match="2-D"):
        quantize_w4a4(torch.randn(64), None, 1)
    with pytest.raises(ValueError, match="bias must have shape"):
        quantize_w4a4(w, torch.randn(8), 1)
    with pytest.raises(ValueError, match="smooth must be positive"):
        quantize_w4a4(w, None, 1, smooth=-torch.ones(64))
    with pytest.raises(ValueError, match="unknown precision"):
        quantize_w4a4(w, None, 1, precision="int3")
