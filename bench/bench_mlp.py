"""Time the fused MLP pair (backends.cuda.mlp_w4a4: fc1 -> GELU(tanh) -> fc2 with the hidden activation
written only in 4 bits) against the same pair as two linears on the 'cuda' backend (fc1, F.gelu, fc2:
the hidden activation written and read in 16 bits), and BF16 F.linear, at FLUX.1's MLP shape
3072 -> 12288 -> 3072 (informative). Median of CUDA-event timings (bench_w4a4.median_ms).

    python bench/bench_mlp.py [--rows 4096,4608] [--rank 32]
"""
import argparse

import torch
import torch.nn.functional as F

from bench_w4a4 import median_ms, random_layer
from nunchaku_ext import cuda_build
from nunchaku_ext.backends import cuda as cuda_backend


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="4096,4608")
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()
    ext = cuda_build.load()
    device = torch.device("cuda", torch.cuda.current_device())
    path = cuda_backend.mma_path(device)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  mma path {path.name}  rank {args.rank}")
    K1, N1, N2 = 3072, 12288, 3072
    fc1 = random_layer(N1, K1, args.rank)
    fc2 = random_layer(N2, N1, args.rank, unsigned=True)
    w1 = torch.randn(N1, K1, device="cuda", dtype=torch.bfloat16) / K1 ** 0.5
    w2 = torch.randn(N2, N1, device="cuda", dtype=torch.bfloat16) / N1 ** 0.5
    p1, p2 = cuda_backend.prepare(fc1, device, path), cuda_backend.prepare(fc2, device, path)
    print(f"{'M':>6} {'bf16 F.linear x2':>16} {'two linears':>12} {'fused':>8} {'fused vs two':>12} | fused parts: "
          f"{'quant x':>8} {'fc1+gelu+quant':>14} {'fc2 gemm':>8}")
    for M in (int(v) for v in args.rows.split(",")):
        xs = [torch.randn(M, K1, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        t_bf16 = median_ms(lambda x: F.linear(F.gelu(F.linear(x, w1), approximate="tanh"), w2), xs)
        t_two = median_ms(lambda x: cuda_backend.forward(fc2, F.gelu(cuda_backend.forward(fc1, x), approximate="tanh")), xs)
        t_fused = median_ms(lambda x: cuda_backend.mlp_w4a4(fc1, fc2, x), xs)
        qs = [ext.quantize_act_lora_down(x, p1.smooth, p1.lora_down, False, path.name) for x in xs]
        t_quant = median_ms(lambda x: ext.quantize_act_lora_down(x, p1.smooth, p1.lora_down, False, path.name), xs)
        t_fc1 = median_ms(lambda q: ext.w4a4_mlp_fc1(*q, p1.wgt_packed, p1.wgt_scales, p1.lora_up, p1.bias, M, N1,
                                                     path.name, torch.bfloat16, p2.smooth, p2.lora_down), qs)
        hs = [ext.w4a4_mlp_fc1(*q, p1.wgt_packed, p1.wgt_scales, p1.lora_up, p1.bias, M, N1, path.name,
                               torch.bfloat16, p2.smooth, p2.lora_down) for q in qs]
        t_fc2 = median_ms(lambda h: ext.w4a4_gemm(*h, p2.wgt_packed, p2.wgt_scales, p2.lora_up, p2.bias, M, N2, True,
                                                  path.name, torch.bfloat16), hs)
        print(f"{M:>6} {t_bf16:>13.3f} ms {t_two:>9.3f} ms {t_fused:>5.3f} ms {t_two / t_fused:>11.2f}x | "
              f"{t_quant:>5.3f} ms {t_fc1:>11.3f} ms {t_fc2:>5.3f} ms")


if __name__ == "__main__":
    main()
