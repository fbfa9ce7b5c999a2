"""Every FLUX.1-dev W4A4 linear at 1024x1024 (DESIGN.md §6), the WHOLE SVDQuant linear on our kernels against
the peers, in one process and one run (issue 6's benchmark). One command on an H100/H200:

    python bench/bench_flux_linears.py [--out DIR] [--quick] [--budget-s 220] [--commit SHA]

(comfy-kitchen and bitsandbytes are not in the device image: docs/benchmarks.md says how they travel as wheels.)

Shapes (M = tokens x batch, batch 1 and 2):
  double blocks, image stream M = 4096 and text stream M = 512 / 256: qkv 3072->9216, proj 3072->3072,
      fc1 3072->12288, fc2 12288->3072 (fc2 with the unsigned, shifted GELU input as in INT4 files);
  single blocks, M = 4608 (4096 + 512 text) and 4352 (4096 + 256): linear1 3072->21504, linear2 15360->3072;
  the MLP pair fc1 -> GELU(tanh) -> fc2 at the double blocks' M.
(The adaLN modulation linears, M = batch, are W4A16: bench/bench_w4a16.py.)

Per linear, each timed the same way:
  bf16        F.linear (cuBLAS), the bar;
  svdq r32    our whole linear, backends.cuda.forward: kernel A (activation quantize + low-rank down) and
              kernel B (GEMM + low-rank up + bias), rank 32; and its parts (kernel A alone, kernel B alone);
  svdq r0     the same layer shape at rank 0: the low-rank branch's cost is r32 / r0 - 1;
  fp8         torch._scaled_mm, e4m3 weight and activation, row-wise fp32 scales, bf16 out + bias:
              "fp8 +q" includes the activation quantization (eager torch: amax per row, divide, cast),
              "fp8 mm" the GEMM alone on pre-quantized inputs;
  kitchen     comfy-kitchen's quantize_svdquant_w4a4 + scaled_mm_svdquant_w4a4 (its CUDA backend, natural
              weight layout, rank 32; for fc2 the input is pre-shifted outside the timing as its API asks);
  nf4         bitsandbytes matmul_4bit, NF4 weight (blocksize 64, no double quantization), bf16 compute.
A peer that can't be imported or run on this machine is reported as "n/a (reason)".

Timing: each call is timed with CUDA events around it alone; before each call a write of 2x the L2 size
evicts L2 (so weights and inputs come from device memory, as in a model where every linear runs once per
block), and inputs rotate over several buffers (>= 3 sets, >= 2x L2 in all). Median over adaptive
repetitions (about --target-ms of GPU time per timing, 5..40 reps) after warm-up. TOPS = 2MNK / time;
"% ceil" = our TOPS over the measured s8 mma.sync rate (DESIGN.md §5: 1291 TOPS H200, 1190 TOPS H100).

Output: a markdown table printed last; the full results as JSON under --out (default $OUT, else /tmp).
"""
import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MMA_S8_CEILING_TOPS = {"H200": 1291, "H100": 1190}  # DESIGN.md §5, mma.sync s8 m16n8k32 register-only loop
RANK = 32
GELU_SHIFT = 0.171875  # the unsigned fc2 input's shift (numerics: GELU(tanh) >= -0.17)

H, MLP = 3072, 12288


def flux_linears(quick=False):
    """(block, name, M, N, K, unsigned, batch) for every W4A4 linear of FLUX.1-dev at 1024x1024."""
    rows = []
    batches = (1,) if quick else (1, 2)
    for batch in batches:
        for stream, tokens in (("img", 4096), ("txt", 512), ("txt", 256)):
            if quick and tokens == 256:
                continue
            for name, n, k, uns in (("qkv", 3 * H, H, False), ("proj", H, H, False),
                                    ("fc1", MLP, H, False), ("fc2", H, MLP, True)):
                rows.append(("double", f"{stream}_{name}", tokens * batch, n, k, uns, batch))
        for tokens in (4608, 4352):
            if quick and tokens == 4352:
                continue
            for name, n, k in (("linear1", 3 * H + MLP, H), ("linear2", H, H + MLP)):
                rows.append(("single", name, tokens * batch, n, k, False, batch))
    return rows


def mlp_pairs(quick=False):
    out = []
    for batch in ((1,) if quick else (1, 2)):
        for stream, tokens in (("img", 4096), ("txt", 512), ("txt", 256)):
            if quick and tokens == 256:
                continue
            out.append((f"{stream}_mlp", tokens * batch, batch))
    return out


# ------------------------------------------------------------------------------------------------
# timing


class Timer:
    def __init__(self, target_ms, min_reps=5, max_reps=40, warmup=3, rest_s=0.2):
        # rest_s: the GPU idles this long before each timing, so that every method starts from the same
        # clocks. Without it, a method timed right after a long heavy one ran up to 19% slower (H100,
        # 2026-11-22: single-block linear2 1.09 ms after the peers, 0.915 ms with the rest).
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        self.l2 = l2
        self.flush_buf = torch.empty(max(2 * l2, 64 << 20) // 4, dtype=torch.int32, device="cuda")
        self.target_ms, self.min_reps, self.max_reps, self.warmup = target_ms, min_reps, max_reps, warmup
        self.rest_s = rest_s

    def flush(self):
        self.flush_buf.fill_(0x5A5A5A5A)

    def __call__(self, fn, inputs):
        """Median ms of fn(input) over rotating inputs, each call after an L2 flush, CUDA events around the call."""
        n = len(inputs)
        torch.cuda.synchronize()
        time.sleep(self.rest_s)  # an idle GPU before each timing (see __init__)
        for i in range(self.warmup):
            self.flush()
            fn(inputs[i % n])
        torch.cuda.synchronize()
        # one probe call to size the repetitions
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.flush()
        s.record()
        fn(inputs[0])
        e.record()
        e.synchronize()
        probe = s.elapsed_time(e)
        reps = int(min(self.max_reps, max(self.min_reps, self.target_ms / max(probe, 1e-3))))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        # Keep the GPU busy while the host queues every repetition, so no launch gap is timed. Always, not
        # only after a short probe: a slow probe (a one-off hiccup) once left a whole cell timed with the
        # host's gaps (H100, 2026-11-22: txt_proj rank 0, every repetition >= 0.48 ms against 0.033).
        torch.cuda._sleep(50_000_000)
        for i, (s, e) in enumerate(events):
            self.flush()  # also gives the host a head start, so launch overhead stays out of small calls
            s.record()
            fn(inputs[(i + 1) % n])
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
        return {"ms": statistics.median(times), "reps": reps, "min_ms": min(times), "max_ms": max(times)}


def input_sets(M, K, l2, make):
    per = M * K * 2
    n = max(3, min(16, math.ceil(2 * l2 / per)))
    return [make() for _ in range(n)]


def na(e):
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return "n/a (" + (msg[:160] + "..." if len(msg) > 160 else msg) + ")"


# ------------------------------------------------------------------------------------------------
# methods: each make_* returns fn(x) or raises (-> "n/a (reason)")


def make_bf16(N, K, dev):
    w = (torch.randn(N, K, device=dev) / K ** 0.5).to(torch.bfloat16)
    b = torch.randn(N, device=dev, dtype=torch.bfloat16)
    return w, b, (lambda x: F.linear(x, w, b))


def fp8_quant_rows(t):
    """Row-wise e4m3: (fp8 tensor, fp32 scales [rows, 1]), eager torch."""
    s = t.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / 448.0
    return (t.float() / s).to(torch.float8_e4m3fn), s


def make_fp8(w, b):
    w8, sw = fp8_quant_rows(w)
    w8t, sw_row = w8.t(), sw.reshape(1, -1).contiguous()  # column-major B operand, scales [1, N]
    try:  # bias in the epilogue where this torch's row-wise path takes one, else a separate add
        p8, ps = fp8_quant_rows(torch.randn(16, w.shape[1], device=w.device, dtype=w.dtype))
        torch._scaled_mm(p8, w8t, scale_a=ps, scale_b=sw_row, bias=b, out_dtype=torch.bfloat16)
        fused_bias = True
    except RuntimeError:
        fused_bias = False

    def mm(x8, sx):
        if fused_bias:
            return torch._scaled_mm(x8, w8t, scale_a=sx, scale_b=sw_row, bias=b, out_dtype=torch.bfloat16)
        return torch._scaled_mm(x8, w8t, scale_a=sx, scale_b=sw_row, out_dtype=torch.bfloat16) + b

    def full(x):
        return mm(*fp8_quant_rows(x))

    return full, mm


def make_kitchen(N, K, rank, unsigned, dev):
    import comfy_kitchen as ck
    from comfy_kitchen.registry import registry

    quantize = registry.get_implementation("quantize_svdquant_w4a4", backend="cuda")
    scaled_mm = registry.get_implementation("scaled_mm_svdquant_w4a4", backend="cuda")
    bf = torch.bfloat16
    wgt = torch.randint(-128, 128, (N, K // 2), device=dev, dtype=torch.int8)
    wscales = (torch.rand(K // 64, N, device=dev) * 0.02 + 1e-3).to(bf)
    smooth = (torch.rand(K, device=dev) + 0.5).to(bf)
    lora_down = (torch.randn(K, rank, device=dev) / K ** 0.5).to(bf)
    lora_up = (torch.randn(N, rank, device=dev) * 0.1).to(bf)
    bias = torch.randn(N, device=dev).to(bf)

    def fn(xin):
        x, raw = xin if isinstance(xin, tuple) else (xin, None)
        act, ascales, lora_act = quantize(x, smooth, lora_down, 256, unsigned, raw)
        return scaled_mm(act, wgt, ascales, wscales, lora_act, lora_up, bias, unsigned)

    return fn, getattr(ck, "__version__", "?")


def make_nf4(w, b):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    qw, state = bf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    return (lambda x: bnb.matmul_4bit(x, qw, quant_state=state, bias=b)), bnb.__version__


# ------------------------------------------------------------------------------------------------


def env_info(args):
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "sms": torch.cuda.get_device_properties(0).multi_processor_count,
            "l2_mb": torch.cuda.get_device_properties(0).L2_cache_size / 2 ** 20,
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version(),
            "commit": args.commit or os.environ.get("SVDQ_COMMIT", "unknown")}
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                         "--format=csv,noheader"], capture_output=True, text=True,
                                        timeout=20).stdout.strip()
    except Exception as e:  # noqa: BLE001
        info["driver"] = na(e)
    return info


def ceiling_for(gpu_name):
    for key, v in MMA_S8_CEILING_TOPS.items():
        if key in gpu_name:
            return key, v
    return None, None


def fmt_t(ms):
    if ms is None:
        return "n/a"
    us = ms * 1e3
    return f"{us:.1f} µs" if us < 100 else f"{us:.0f} µs" if us < 1000 else f"{ms:.2f} ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp")
    ap.add_argument("--quick", action="store_true", help="batch 1, M=4096/512/4608 only")
    ap.add_argument("--target-ms", type=float, default=40.0, help="GPU time per timing (sets the repetitions)")
    ap.add_argument("--budget-s", type=float, default=220.0, help="skip what is left after this many seconds")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--skip", default="", help="comma list of methods to skip: kitchen,nf4,fp8,svdq,mlp")
    args = ap.parse_args()
    t_start = time.time()
    skip = set(filter(None, args.skip.split(",")))
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda", 0)
    info = env_info(args)
    ceil_key, ceiling = ceiling_for(info["gpu"])
    info["mma_s8_ceiling_tops"] = ceiling
    print(json.dumps(info), flush=True)

    # Each peer once: importable? (a failure is reported per row as n/a, never a crash)
    status = {}
    try:
        from nunchaku_ext import cuda_build
        t = time.time()
        cuda_build.load()
        from nunchaku_ext.backends import cuda as cb
        status["svdq"] = f"ok (mma path {cb.mma_path(dev).name}, build+load {time.time() - t:.0f} s)"
        status["svdq_mlp"] = "ok" if hasattr(cb, "mlp_w4a4") else "n/a (backends.cuda.mlp_w4a4 not present)"
    except Exception as e:  # noqa: BLE001
        status["svdq"] = status["svdq_mlp"] = na(e)
    try:
        import comfy_kitchen as ck
        from comfy_kitchen.registry import registry
        registry.get_implementation("scaled_mm_svdquant_w4a4", backend="cuda")
        from importlib.metadata import version
        status["kitchen"] = f"ok (comfy-kitchen {version('comfy-kitchen')}, cuda backend)"
    except Exception as e:  # noqa: BLE001
        status["kitchen"] = na(e)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional  # noqa: F401
        status["nf4"] = f"ok (bitsandbytes {bnb.__version__})"
    except Exception as e:  # noqa: BLE001
        status["nf4"] = na(e)
    for k in skip:
        status[k] = "n/a (skipped by --skip)"
    info["peers"] = status
    print("peers:", json.dumps(status), flush=True)

    timer = Timer(args.target_ms)
    results, mlp_results = [], []
    out_path = os.path.join(args.out, "bench_flux_linears.json")

    def dump():
        os.makedirs(args.out, exist_ok=True)
        with open(out_path, "w") as f:
            json.dump({"env": info, "linears": results, "mlp": mlp_results,
                       "elapsed_s": round(time.time() - t_start, 1)}, f, indent=1)

    def ok(key):
        return status.get(key, "").startswith("ok")

    def timed(row, key, fn, inputs):
        if time.time() - t_start > args.budget_s:
            row[key] = "n/a (time budget of the run spent)"
            return None
        try:
            r = timer(fn, inputs)
            row[key] = r
            return r["ms"]
        except Exception as e:  # noqa: BLE001
            row[key] = na(e)
            traceback.print_exc(limit=2)
            return None
        finally:
            torch.cuda.synchronize()

    with torch.no_grad():
        for block, name, M, N, K, unsigned, batch in flux_linears(args.quick):
            row = {"block": block, "name": name, "batch": batch, "M": M, "N": N, "K": K, "unsigned": unsigned,
                   "flop": 2 * M * N * K}

            def mk():
                x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
                return F.gelu(x, approximate="tanh") if unsigned else x

            xs = input_sets(M, K, timer.l2, mk)
            row["input_sets"] = len(xs)
            w, b, bf16 = make_bf16(N, K, dev)
            timed(row, "bf16", bf16, xs)
            if "fp8" not in skip:
                try:
                    fp8_full, fp8_mm = make_fp8(w, b)
                    timed(row, "fp8_incl_quant", fp8_full, xs)
                    qs = [fp8_quant_rows(x) for x in xs]
                    timed(row, "fp8_gemm_only", lambda q: fp8_mm(*q), qs)
                    del qs
                except Exception as e:  # noqa: BLE001
                    row["fp8_incl_quant"] = row["fp8_gemm_only"] = na(e)
            else:
                row["fp8_incl_quant"] = row["fp8_gemm_only"] = status["fp8"]
            if ok("nf4"):
                try:
                    nf4, _ = make_nf4(w, b)
                    timed(row, "nf4", nf4, xs)
                except Exception as e:  # noqa: BLE001
                    row["nf4"] = na(e)
            else:
                row["nf4"] = status["nf4"]
            del w
            if ok("svdq"):
                from bench_w4a4 import random_layer
                from nunchaku_ext.backends import cuda as cb
                for rank, key in ((RANK, "svdq_r32"), (0, "svdq_r0")):
                    try:
                        layer = random_layer(N, K, rank, unsigned=unsigned)
                        timed(row, key, lambda x: cb.forward(layer, x), xs)
                        if rank == RANK:  # the two kernels alone
                            path = cb.layer_mma_path(layer, dev)
                            row["svdq_path"] = path.name
                            quant = lambda x: cb.kernel_a(layer, x, path)  # noqa: E731
                            timed(row, "svdq_r32_kernelA_quant_down", quant, xs)
                            qs = [quant(x) for x in xs]
                            timed(row, "svdq_r32_kernelB_gemm", lambda q: cb.kernel_b(layer, q, M, path), qs)
                            del qs
                        del layer
                    except Exception as e:  # noqa: BLE001
                        row.setdefault(key, na(e))
                        traceback.print_exc(limit=2)
            else:
                row["svdq_r32"] = row["svdq_r0"] = status["svdq"]
            if ok("kitchen"):
                try:
                    kfn, _ = make_kitchen(N, K, RANK, unsigned, dev)
                    kin = [(x + GELU_SHIFT, x) for x in xs] if unsigned else xs
                    timed(row, "kitchen", kfn, kin)
                    del kin
                except Exception as e:  # noqa: BLE001
                    row["kitchen"] = na(e)
            else:
                row["kitchen"] = status["kitchen"]
            del xs
            torch.cuda.empty_cache()
            results.append(row)
            print(json.dumps({k: (v["ms"] if isinstance(v, dict) else v) for k, v in row.items()}), flush=True)
            dump()

        # the MLP pair fc1 -> GELU(tanh) -> fc2 (double blocks)
        for name, M, batch in ([] if "mlp" in skip else mlp_pairs(args.quick)):
            row = {"name": name, "batch": batch, "M": M, "N1": MLP, "K": H, "flop": 2 * 2 * M * MLP * H}
            xs = input_sets(M, H, timer.l2, lambda: torch.randn(M, H, device=dev, dtype=torch.bfloat16))
            w1, b1, _ = make_bf16(MLP, H, dev)
            w2, b2, _ = make_bf16(H, MLP, dev)
            timed(row, "bf16", lambda x: F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2), xs)
            try:
                f1, m1 = make_fp8(w1, b1)
                f2, m2 = make_fp8(w2, b2)
                timed(row, "fp8_incl_quant", lambda x: f2(F.gelu(f1(x), approximate="tanh")), xs)
            except Exception as e:  # noqa: BLE001
                row["fp8_incl_quant"] = na(e)
            if ok("nf4"):
                try:
                    n1, _ = make_nf4(w1, b1)
                    n2, _ = make_nf4(w2, b2)
                    timed(row, "nf4", lambda x: n2(F.gelu(n1(x), approximate="tanh")), xs)
                except Exception as e:  # noqa: BLE001
                    row["nf4"] = na(e)
            else:
                row["nf4"] = status["nf4"]
            del w1, w2
            if ok("svdq"):
                from bench_w4a4 import random_layer
                from nunchaku_ext.backends import cuda as cb
                for rank, key in ((RANK, "r32"), (0, "r0")):
                    try:
                        fc1 = random_layer(MLP, H, rank)
                        fc2 = random_layer(H, MLP, rank, unsigned=True)
                        if ok("svdq_mlp"):
                            timed(row, f"svdq_fused_{key}", lambda x: cb.mlp_w4a4(fc1, fc2, x), xs)
                        else:
                            row[f"svdq_fused_{key}"] = status["svdq_mlp"]
                        timed(row, f"svdq_two_linears_{key}",
                              lambda x: cb.forward(fc2, F.gelu(cb.forward(fc1, x), approximate="tanh")), xs)
                        del fc1, fc2
                    except Exception as e:  # noqa: BLE001
                        row.setdefault(f"svdq_fused_{key}", na(e))
                        traceback.print_exc(limit=2)
            if ok("kitchen"):
                try:
                    k1, _ = make_kitchen(MLP, H, RANK, False, dev)
                    k2, _ = make_kitchen(H, MLP, RANK, True, dev)

                    def kpair(x):
                        h = F.gelu(k1(x)[:M], approximate="tanh")
                        return k2((h + GELU_SHIFT, h))

                    timed(row, "kitchen", kpair, xs)
                except Exception as e:  # noqa: BLE001
                    row["kitchen"] = na(e)
            else:
                row["kitchen"] = status["kitchen"]
            del xs
            torch.cuda.empty_cache()
            mlp_results.append(row)
            print(json.dumps({k: (v["ms"] if isinstance(v, dict) else v) for k, v in row.items()}), flush=True)
            dump()

    info["elapsed_s"] = round(time.time() - t_start, 1)
    dump()
    print_tables(info, results, mlp_results, ceiling, ceil_key)
    print(f"\nfull results: {out_path}")
    return 0


def ms(row, key):
    v = row.get(key)
    return v["ms"] if isinstance(v, dict) else None


def cell_speed(row, key):
    """'0.62× (412 µs)' relative to BF16, or the n/a reason."""
    t, b = ms(row, key), ms(row, "bf16")
    v = row.get(key)
    if t is None:
        return "n/a" if v is None else (v if len(str(v)) < 40 else str(v)[:37] + "...)")
    return f"{b / t:.2f}×" if b else fmt_t(t)


def print_tables(info, results, mlp_results, ceiling, ceil_key):
    print()
    print(f"GPU {info['gpu']} · driver {info.get('driver')} · torch {info['torch']} · commit {info['commit']} · "
          f"{info['date_utc']}")
    print(f"peers: {json.dumps(info['peers'])}")
    print(f"speeds are BF16 time / method time (>1 = faster than BF16); % ceil = svdq r32 TOPS / {ceiling} TOPS "
          f"(measured s8 mma.sync, {ceil_key}); low-rank = svdq r32 / r0 - 1")
    print()
    print("| block | linear | M | N×K | BF16 | BF16 TFLOP/s | svdq r32 | ×BF16 | TOPS | % ceil | r0 ×BF16 | low-rank cost "
          "| kernel A / B | FP8 +q | FP8 mm | kitchen | NF4 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        b, s, s0 = ms(r, "bf16"), ms(r, "svdq_r32"), ms(r, "svdq_r0")
        ka, kb = ms(r, "svdq_r32_kernelA_quant_down"), ms(r, "svdq_r32_kernelB_gemm")
        tops = r["flop"] / s / 1e9 if s else None
        print(f"| {r['block']} | {r['name']}{' (u)' if r['unsigned'] else ''} | {r['M']} | {r['N']}×{r['K']} | {fmt_t(b)} "
              f"| {'%.0f' % (r['flop'] / b / 1e9) if b else 'n/a'} | {fmt_t(s)} | {cell_speed(r, 'svdq_r32')} "
              f"| {'%.0f' % tops if tops else 'n/a'} | {'%.0f%%' % (100 * tops / ceiling) if tops and ceiling else 'n/a'} "
              f"| {cell_speed(r, 'svdq_r0')} | {'%+.0f%%' % (100 * (s / s0 - 1)) if s and s0 else 'n/a'} "
              f"| {fmt_t(ka)} / {fmt_t(kb)} | {cell_speed(r, 'fp8_incl_quant')} | {cell_speed(r, 'fp8_gemm_only')} "
              f"| {cell_speed(r, 'kitchen')} | {cell_speed(r, 'nf4')} |")
    if mlp_results:
        print()
        print("MLP pair fc1 3072→12288 → GELU(tanh) → fc2 12288→3072 (speeds vs the BF16 pair):")
        print()
        print("| pair | M | BF16 pair | svdq fused r32 | ×BF16 | TOPS | fused r0 ×BF16 | low-rank cost | svdq two linears r32 "
              "| FP8 +q | kitchen | NF4 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in mlp_results:
            s, s0 = ms(r, "svdq_fused_r32"), ms(r, "svdq_fused_r0")
            tops = r["flop"] / s / 1e9 if s else None
            print(f"| {r['name']} | {r['M']} | {fmt_t(ms(r, 'bf16'))} | {fmt_t(s)} | {cell_speed(r, 'svdq_fused_r32')} "
                  f"| {'%.0f' % tops if tops else 'n/a'} | {cell_speed(r, 'svdq_fused_r0')} "
                  f"| {'%+.0f%%' % (100 * (s / s0 - 1)) if s and s0 else 'n/a'} | {cell_speed(r, 'svdq_two_linears_r32')} "
                  f"| {cell_speed(r, 'fp8_incl_quant')} | {cell_speed(r, 'kitchen')} | {cell_speed(r, 'nf4')} |")


if __name__ == "__main__":
    sys.exit(main())
