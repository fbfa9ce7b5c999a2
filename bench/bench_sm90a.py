"""sm_90's W4A4 paths side by side on the FLUX.1-dev linears: the wgmma path (e4m3_wgmma_sm90a, csrc/w4a4_sm90a.cu)
and the mma.sync path (s8_m16n8k32), each the WHOLE linear (backends.cuda.forward: kernel A + GEMM with the
low-rank up projection and bias), against BF16 F.linear. One command on an H100/H200:

    python3 bench/bench_sm90a.py [--out DIR] [--quick]

Timing as bench/bench_flux_linears.py (its Timer): CUDA events around each call alone, L2 evicted before every
call, inputs rotating over >= 3 buffer sets, median of 5..40 repetitions. Rank 32 and rank 0; the wgmma path's
kernel A and GEMM also alone. Prints a markdown table; JSON under --out (default $OUT, else /tmp).
"""
import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_flux_linears import Timer, input_sets, make_bf16  # noqa: E402
from bench_w4a4 import random_layer  # noqa: E402
from nunchaku_ext.backends import cuda as cb  # noqa: E402

H, MLP = 3072, 12288
LINEARS = [("qkv", 3 * H, H, False), ("proj", H, H, False), ("fc1", MLP, H, False), ("fc2 (u)", H, MLP, True),
           ("linear1", 3 * H + MLP, H, False), ("linear2", H, H + MLP, False)]


def fmt(ms):
    return f"{ms * 1000:.1f} µs" if ms < 1 else f"{ms:.2f} ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device())
    assert torch.cuda.get_device_capability() == (9, 0), "the wgmma path runs on sm_90"
    timer = Timer(target_ms=20 if args.quick else 40)
    rows = []
    shapes = [(name, (4608 if name.startswith("linear") else 4096), n, k, u) for name, n, k, u in LINEARS]
    shapes += [(name, 512, n, k, u) for name, n, k, u in LINEARS]
    for name, M, N, K, unsigned in shapes:
        row = dict(name=name, M=M, N=N, K=K)
        xs = input_sets(M, K, timer.l2, lambda: torch.randn(M, K, device=dev, dtype=torch.bfloat16))
        _, _, bf16 = make_bf16(N, K, dev)
        row["bf16"] = timer(bf16, xs)["ms"]
        for rank in (32, 0):
            layer = random_layer(N, K, rank, unsigned=unsigned)
            for path in ("e4m3_wgmma_sm90a", "s8_m16n8k32"):
                if rank == 0 and path == "s8_m16n8k32":
                    continue
                os.environ[cb.PATH_ENV] = path
                assert cb.layer_mma_path(layer, dev).name == path
                row[f"{path}_r{rank}"] = timer(lambda x: cb.forward(layer, x), xs)["ms"]
            if rank == 32:  # the wgmma path's two kernels alone
                quant = lambda x: cb.kernel_a(layer, x, cb.WGMMA_PATH)  # noqa: E731
                row["wgmma_kernelA"] = timer(quant, xs)["ms"]
                qs = [quant(x) for x in xs]
                row["wgmma_gemm"] = timer(lambda q: cb.kernel_b(layer, q, M, cb.WGMMA_PATH), qs)["ms"]
                del qs
            del layer
        os.environ.pop(cb.PATH_ENV, None)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del xs
        torch.cuda.empty_cache()
    props = torch.cuda.get_device_properties(0)
    head = (f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    lines = [head, "",
             "| linear | M | N×K | BF16 | wgmma r32 | ×BF16 | TOPS | wgmma r0 ×BF16 | kernel A / GEMM (wgmma) "
             "| s8 mma.sync r32 | ×BF16 | wgmma vs s8 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w, s = r["e4m3_wgmma_sm90a_r32"], r["s8_m16n8k32_r32"]
        lines.append(f"| {r['name']} | {r['M']} | {r['N']}×{r['K']} | {fmt(r['bf16'])} | {fmt(w)} | "
                     f"{r['bf16'] / w:.2f}× | {2 * r['M'] * r['N'] * r['K'] / w / 1e9:.0f} | "
                     f"{r['bf16'] / r['e4m3_wgmma_sm90a_r0']:.2f}× | {fmt(r['wgmma_kernelA'])} / "
                     f"{fmt(r['wgmma_gemm'])} | {fmt(s)} | {r['bf16'] / s:.2f}× | {s / w:.2f}× |")
    print("\n".join(lines))
    with open(os.path.join(args.out, "bench_sm90a.json"), "w") as f:
        json.dump(dict(device=head, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
