"""The MLP pair of a transformer block, fc2(GELU_tanh(fc1(x))), written literally in torch on the
reference backend: the spec of backends.cuda.mlp_w4a4 (csrc/w4a4_mlp.cuh).

Where it rounds (and the fused kernel rounds at the same points): fc1's output is rounded to the
activation dtype, as every linear's output is; GELU(tanh) is evaluated on it in fp32 and rounded to
the dtype again (what F.gelu does for a bf16/fp16 tensor); that h is fc2's input, which fc2 shifts,
smooths and quantizes in fp32 (numerics.smooth_input / quantize_act_int4, unsigned for FLUX's fc2).
"""
import torch.nn.functional as F

from . import reference


def hidden(fc1, x):
    """h = GELU_tanh(fc1(x)), in x.dtype."""
    return F.gelu(reference.w4a4_linear(fc1, x), approximate="tanh")


def mlp_w4a4(fc1, fc2, x):
    return reference.w4a4_linear(fc2, hidden(fc1, x))
