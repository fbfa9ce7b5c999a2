"""Time the 'cuda' backend's W4A16 linear (modulation layers) against F.linear on dense 16-bit
weights. The problem is memory-bound, so the table gives the bytes it must move (4-bit weights +
16-bit scales, zeros and bias + x + y) over the time. Each timing cycles over several layers whose
weights together exceed L2, so every call reads its weights from device memory, as in a model. Two
times per call: "call" (CUDA events around each call: includes the Python and launch overhead when
the GPU waits for the host) and "gpu" (the calls captured in one CUDA graph and replayed: device
time only). "extra MB": device memory a layer's first call leaves allocated beyond its output (the
kernel reads the layer's buffers in place: 0).

    python bench/bench_w4a16.py [--shapes 1x18432x3072,...] [--dtype bf16|fp16]
"""
import argparse
import statistics

import torch
import torch.nn.functional as F

from nunchaku_ext import cuda_build, numerics
from nunchaku_ext.backends import cuda as cuda_backend
from nunchaku_ext.layers import W4A16Linear

COPIES = 6  # layers cycled per timing: 6 x 31.5 MB at N = 18432 is well past an H100/H200 L2 (50 MB)


def median_ms(fn, n, warmup=10, reps=60):
    for i in range(warmup):
        fn(i % n)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % n)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_us(fn, n, reps=20):
    """Device time per call: fn(0..n-1) captured in one CUDA graph, median replay time / n."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (builds, allocates)
        for i in range(n):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            fn(i)
    return median_ms(lambda _: graph.replay(), 1, warmup=3, reps=reps) * 1e3 / n


def random_layer(N, K, dtype):
    layer = W4A16Linear(K, N, bias=True, dtype=dtype, device="cuda")
    layer.qweight.copy_(numerics.pack_4bit(torch.randint(0, 16, (N, K), device="cuda")))
    layer.wscales.copy_((torch.rand(K // 64, N, device="cuda") * 0.01).to(dtype))
    layer.wzeros.copy_((torch.randn(K // 64, N, device="cuda") * 0.05).to(dtype))
    layer.bias.copy_(torch.randn(N, device="cuda").to(dtype))
    layer.backend = "cuda"
    return layer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1x18432x3072,2x18432x3072,4x18432x3072,8x18432x3072,16x18432x3072,"
                                        "1x9216x3072,4x9216x3072,64x18432x3072")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="layer and input dtype")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cuda_build.load()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}")
    d = args.dtype
    print(f"{'M x N x K':>16} {d + ' call':>10} {'w4a16 call':>10} {d + ' gpu':>9} {'w4a16 gpu':>9} "
          f"{'gpu speed vs ' + d:>17} {'w4a16 gpu GB/s':>14} {'extra MB':>8}")
    for shape in args.shapes.split(","):
        M, N, K = (int(v) for v in shape.split("x"))
        layers = [random_layer(N, K, dtype) for _ in range(COPIES)]
        weights = [torch.randn(N, K, device="cuda", dtype=dtype) for _ in range(COPIES)]
        bias = torch.randn(N, device="cuda", dtype=dtype)
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        def run_q(i):
            return cuda_backend.w4a16_linear(layers[i], x)

        def run_b(i):
            return F.linear(x, weights[i], bias)

        call_q, call_b = median_ms(run_q, COPIES) * 1e3, median_ms(run_b, COPIES) * 1e3
        gpu_q, gpu_b = graph_us(run_q, COPIES), graph_us(run_b, COPIES)
        fresh = random_layer(N, K, dtype)  # its first call: where a kernel would make a copy of its own
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = cuda_backend.w4a16_linear(fresh, x)
        torch.cuda.synchronize()
        extra = torch.cuda.memory_allocated() - before - y.untyped_storage().nbytes()
        del y, fresh
        moved = N * K // 2 + (K // 64) * N * 4 + M * K * 2 + M * N * 2 + N * 2
        print(f"{shape:>16} {call_b:>7.1f} us {call_q:>7.1f} us {gpu_b:>6.1f} us {gpu_q:>6.1f} us "
              f"{gpu_b / gpu_q:>16.2f}x {moved / (gpu_q * 1e-6) / 1e9:>14.0f} {max(extra, 0) / 2**20:>8.1f}",
              flush=True)
        del layers, weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
