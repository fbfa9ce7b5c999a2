"""Time the 'cuda' backend's W4A4 linear against BF16 F.linear at FLUX.1 shapes (informative;
speed tuning is the next milestone). Median of CUDA-event timings after warm-up, inputs rotated
over several buffers so the activations don't sit in L2 from the previous call.

    python bench/bench_w4a4.py [--shapes 4096x12288x3072,...]
"""
import argparse
import statistics

import torch
import torch.nn.functional as F

from nunchaku_ext import cuda_build
from nunchaku_ext.backends import cuda as cuda_backend
from nunchaku_ext.layers import SVDQW4A4Linear
from nunchaku_ext import numerics


def median_ms(fn, inputs, warmup=10, reps=50):
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(inputs[i % len(inputs)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def random_layer(N, K, rank, dtype=torch.bfloat16, unsigned=False):
    layer = SVDQW4A4Linear(K, N, rank, bias=True, act_unsigned=unsigned, dtype=dtype, device="cuda")
    layer.qweight.copy_(numerics.pack_4bit(torch.randint(-8, 8, (N, K), device="cuda")))
    layer.wscales.copy_((torch.rand(K // 64, N, device="cuda") * 0.02 + 1e-3).to(dtype))
    layer.smooth.copy_((torch.rand(K, device="cuda") + 0.5).to(dtype))
    layer.lora_down.copy_((torch.randn(rank, K, device="cuda") / K ** 0.5).to(dtype))
    layer.lora_up.copy_((torch.randn(N, rank, device="cuda") * 0.1).to(dtype))
    layer.bias.copy_(torch.randn(N, device="cuda").to(dtype))
    layer.backend = "cuda"
    return layer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x12288x3072,4608x3072x12288,4096x9216x3072,4608x21504x3072")
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()
    cuda_build.load()  # build before timing
    path = cuda_backend.mma_path(torch.device("cuda", torch.cuda.current_device())).name
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  mma path {path}")
    print(f"{'M x N x K':>20} {'bf16 F.linear':>14} {'w4a4 total':>11} {'quant+down':>11} {'gemm':>8} "
          f"{'speed vs bf16':>13} {'w4a4 TOPS':>9}")
    for shape in args.shapes.split(","):
        M, N, K = (int(v) for v in shape.split("x"))
        layer = random_layer(N, K, args.rank)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
        xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        t_bf16 = median_ms(lambda x: F.linear(x, w, b), xs)
        t_total = median_ms(lambda x: cuda_backend.forward(layer, x), xs)
        path = cuda_backend.layer_mma_path(layer, torch.device("cuda", torch.cuda.current_device()))
        t_quant = median_ms(lambda x: cuda_backend.kernel_a(layer, x, path), xs)
        qs = [cuda_backend.kernel_a(layer, x, path) for x in xs]
        t_gemm = median_ms(lambda q: cuda_backend.kernel_b(layer, q, M, path), qs)
        tops = 2 * M * N * K / t_total / 1e9
        print(f"{shape:>20} {t_bf16:>11.3f} ms {t_total:>8.3f} ms {t_quant:>8.3f} ms {t_gemm:>5.3f} ms "
              f"{t_bf16 / t_total:>12.2f}x {tops:>9.0f}")


if __name__ == "__main__":
    main()
