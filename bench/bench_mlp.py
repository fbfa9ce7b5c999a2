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
    path = cuda_backend._mma_sync_path(cuda_backend.mma_path(device))  # the fused MLP kernels are mma.sync ones
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  mma path {path.name}  rank {args.rank}")
    K1, N1, N2 = 3072, 12288, 3072
    fc1 = random_layer(N1, K1, args.rank)
    fc2 = random_layer(N2, N1, args.rank, unsigned=True)
    w1 = torch.randn(N1, K1, device="cuda", dtype=torch.bfloat16) / K1 ** 0.5
    w2 = torch.randn(N2, N1, device="cuda", dtype=torch.bfloat16) / N1 ** 0.5
    # The layers' own tensors, as the kernels take them (w4a4_mlp_fc1 has no NVFP4 factors)
    smooth2, lora_down2 = cuda_backend._act_operands(fc2, device)
    ops1 = {k: v for k, v in cuda_backend.layer_operands(fc1, device).items() if k not in ("wtscale", "wcscales")}
    print(f"{'M':>6} {'bf16 F.linear x2':>16} {'two linears':>12} {'fused':>8} {'fused vs two':>12} | fused parts: "
          f"{'quant x':>8} {'fc1+gelu+quant':>14} {'fc2 gemm':>8}")
    for M in (int(v) for v in args.rows.split(",")):
        xs = [torch.randn(M, K1, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        t_bf16 = median_ms(lambda x: F.linear(F.gelu(F.linear(x, w1), approximate="tanh"), w2), xs)
        t_two = median_ms(lambda x: cuda_backend.forward(fc2, F.gelu(cuda_backend.forward(fc1, x), approximate="tanh")), xs)
        t_fused = median_ms(lambda x: cuda_backend.mlp_w4a4(fc1, fc2, x), xs)
        qs = [cuda_backend.kernel_a(fc1, x, path) for x in xs]
        t_quant = median_ms(lambda x: cuda_backend.kernel_a(fc1, x, path), xs)

        def fc1_fused(q):
            return ext.w4a4_mlp_fc1(*q, M=M, mma_path=path.name, smooth2=smooth2, lora_down2=lora_down2, **ops1)

        t_fc1 = median_ms(fc1_fused, qs)
        hs = [fc1_fused(q) for q in qs]
        t_fc2 = median_ms(lambda h: cuda_backend.kernel_b(fc2, h, M, path), hs)
        print(f"{M:>6} {t_bf16:>13.3f} ms {t_two:>9.3f} ms {t_fused:>5.3f} ms {t_two / t_fused:>11.2f}x | "
              f"{t_quant:>5.3f} ms {t_fc1:>11.3f} ms {t_fc2:>5.3f} ms")


if __name__ == "__main__":
    main()
