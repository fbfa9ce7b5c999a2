"""`python -m nunchaku_ext doctor`: will the CUDA kernels work on this machine, and how fast are they?

Reports the GPU, its arch and driver, torch and its CUDA version, the CUDA compiler found; builds
the kernels (timed); checks the 'cuda' backend against the 'reference' backend (the spec) on random
FLUX-shaped layers (INT4 signed and unsigned input, NVFP4, W4A16; a small M and M = 4096); and times
one FLUX.1-dev linear (4096 x 12288 x 3072) against BF16 F.linear. Ends with one verdict line.

Exit status: 0 the kernels work here; 1 a check failed (a bug: please report it with this output);
2 the kernels cannot run here (no GPU, an unsupported GPU, no matching CUDA compiler, a failed build),
in which case the verdict says what to do. Never a traceback for an expected problem.
"""
import math
import platform
import shutil
import subprocess
import sys
import time

import torch

from . import cuda_build

OK, CHECK_FAILED, CANNOT_RUN = 0, 1, 2

# Relative Frobenius error that a correct kernel stays far below: the cuda and reference backends
# differ only in fp32 summation order and one final rounding (~1e-4 at worst on these shapes), while
# a wrong group, scale or layout gives errors of order 1e-1 to 1.
CHECK_TOLERANCE = 2e-3

FLUX_SPEED_SHAPE = (4096, 12288, 3072)  # M x N x K: FLUX.1-dev MLP fc1 at 1024x1024


def _line(label, value):
    print(f"  {label:<10} {value}", flush=True)


def _driver_version():
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "unknown (nvidia-smi not found)"
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
        return out[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown (nvidia-smi failed)"


def _verdict(code, text):
    print(f"\nverdict: {text}", flush=True)
    return code


def _cannot_run(reason):
    return _verdict(CANNOT_RUN, "the SVDQuant CUDA kernels cannot run here. " + reason +
                    " Until then the 'reference' backend works on any device (correct, but far slower).")


# ------------------------------------------------------------------------------------------------
# Random layers (valid contents; the checks compare two backends on the same layer)


def _random_w4a4(N, K, rank, precision, unsigned, dtype, gen):
    from .layers import SVDQW4A4Linear
    from .numerics import pack_4bit

    dev = "cuda"
    layer = SVDQW4A4Linear(K, N, rank, bias=True, precision=precision, act_unsigned=unsigned, dtype=dtype, device=dev)
    if precision == "int4":
        codes = torch.randint(-8, 8, (N, K), generator=gen, device=dev)
        layer.wscales.copy_((torch.rand(K // 64, N, generator=gen, device=dev) * 0.02 + 1e-3).to(dtype))
    else:
        codes = torch.randint(0, 16, (N, K), generator=gen, device=dev)
        layer.wscales.copy_((torch.rand(K // 16, N, generator=gen, device=dev) * 8 + 0.05).to(torch.float8_e4m3fn))
        layer.wtscale.fill_(0.004)
        layer.wcscales.copy_(torch.rand(N, generator=gen, device=dev) + 0.5)
    layer.qweight.copy_(pack_4bit(codes))
    layer.smooth.copy_((torch.rand(K, generator=gen, device=dev) + 0.5).to(dtype))
    layer.lora_down.copy_((torch.randn(rank, K, generator=gen, device=dev) / math.sqrt(K)).to(dtype))
    layer.lora_up.copy_((torch.randn(N, rank, generator=gen, device=dev) * 0.1).to(dtype))
    layer.bias.copy_(torch.randn(N, generator=gen, device=dev).to(dtype))
    return layer


def _random_w4a16(N, K, dtype, gen):
    from .layers import W4A16Linear
    from .numerics import pack_4bit

    dev = "cuda"
    layer = W4A16Linear(K, N, bias=True, dtype=dtype, device=dev)
    layer.qweight.copy_(pack_4bit(torch.randint(0, 16, (N, K), generator=gen, device=dev)))
    layer.wscales.copy_((torch.rand(K // 64, N, generator=gen, device=dev) * 0.01 + 1e-4).to(dtype))
    layer.wzeros.copy_((torch.randn(K // 64, N, generator=gen, device=dev) * 0.05).to(dtype))
    layer.bias.copy_(torch.randn(N, generator=gen, device=dev).to(dtype))
    return layer


def _random_input(M, K, dtype, unsigned, gen):
    x = torch.randn(M, K, generator=gen, device="cuda")
    if unsigned:  # a GELU output, the input of an MLP's second linear
        x = torch.nn.functional.gelu(x * 2, approximate="tanh")
    return (x * torch.exp(torch.randn(K, generator=gen, device="cuda") * 0.5)).to(dtype)


# name, layer factory, M values, unsigned input
def _check_cases(dtype):
    return [
        ("int4 signed   img qkv  3072->9216 ", lambda g: _random_w4a4(9216, 3072, 32, "int4", False, dtype, g), False),
        ("int4 unsigned mlp fc2 12288->3072 ", lambda g: _random_w4a4(3072, 12288, 32, "int4", True, dtype, g), True),
        ("nvfp4         proj     3072->3072 ", lambda g: _random_w4a4(3072, 3072, 32, "nvfp4", False, dtype, g), False),
        ("w4a16         mod     3072->18432 ", lambda g: _random_w4a16(18432, 3072, dtype, g), False),
    ]


def _relative_error(y, y_ref):
    y, y_ref = y.float(), y_ref.float()
    if not torch.isfinite(y).all():
        return math.inf
    return ((y - y_ref).norm() / y_ref.norm().clamp_min(1e-30)).item()


def _run_checks(dtype=torch.bfloat16):
    """Each case at a small M and at M = 4096; returns the number of failures."""
    from .backends import cuda as cuda_backend
    from .backends import reference

    failures = 0
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, factory, unsigned in _check_cases(dtype):
        try:
            layer = factory(gen)
            kind = "w4a16" if name.startswith("w4a16") else "w4a4"
            for M in (3, 4096):
                x = _random_input(M, layer.in_features, dtype, unsigned, gen)
                if kind == "w4a16":
                    y, y_ref = cuda_backend.w4a16_linear(layer, x), reference.w4a16_linear(layer, x)
                else:
                    y, y_ref = cuda_backend.w4a4_linear(layer, x), reference.w4a4_linear(layer, x)
                err = _relative_error(y, y_ref)
                ok = err <= CHECK_TOLERANCE
                failures += not ok
                _line("check", f"{name} M={M:<5} {'ok  ' if ok else 'FAIL'} relative error {err:.1e}")
            del layer
        except Exception as e:  # a kernel error is a failed check, reported, not a traceback
            failures += 1
            _line("check", f"{name} FAIL {type(e).__name__}: {e}")
        torch.cuda.empty_cache()
    return failures


def _median_ms(fn, reps=30):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _time_flux_linear(dtype=torch.bfloat16):
    from .backends import cuda as cuda_backend

    M, N, K = FLUX_SPEED_SHAPE
    gen = torch.Generator(device="cuda").manual_seed(1)
    layer = _random_w4a4(N, K, 32, "int4", False, dtype, gen)
    x = _random_input(M, K, dtype, False, gen)
    w = torch.randn(N, K, generator=gen, device="cuda").to(dtype)
    bias = torch.randn(N, generator=gen, device="cuda").to(dtype)
    t_w4a4 = _median_ms(lambda: cuda_backend.w4a4_linear(layer, x))
    t_bf16 = _median_ms(lambda: torch.nn.functional.linear(x, w, bias))
    path = cuda_backend.layer_mma_path(layer, x.device).name
    _line("speed", f"FLUX.1-dev linear {M}x{N}x{K}: W4A4 int4 ({path}) {t_w4a4:.3f} ms, BF16 F.linear "
                   f"{t_bf16:.3f} ms -> {t_bf16 / t_w4a4:.2f}x BF16 speed")


# ------------------------------------------------------------------------------------------------


def main() -> int:
    print("ComfyUI-SVDQuant doctor", flush=True)
    _line("python", f"{platform.python_version()} ({sys.executable})")
    _line("torch", f"{torch.__version__}, CUDA {torch.version.cuda or 'none (CPU-only build)'}")
    if not torch.version.cuda:
        return _cannot_run(f"This torch ({torch.__version__}) is a CPU-only build: install a CUDA build of torch "
                           "(https://pytorch.org/get-started/locally/).")
    if not torch.cuda.is_available():
        _toolkit_line()
        return _cannot_run("No CUDA GPU is visible to torch (torch.cuda.is_available() is False): check that an "
                           "NVIDIA GPU and its driver are installed (nvidia-smi) and that CUDA_VISIBLE_DEVICES "
                           "does not hide it.")
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    _line("GPU", f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.1f} GiB, "
                 f"driver {_driver_version()}")
    try:
        arch = cuda_build.device_arch()
    except cuda_build.CudaBuildError as e:
        return _cannot_run(str(e))
    if not _toolkit_line():
        return _cannot_run("No CUDA compiler matching torch was found: the nvcc line above says how to fix it.")

    t0 = time.monotonic()
    try:
        cuda_build.load()
    except cuda_build.CudaBuildError as e:
        return _cannot_run(str(e))
    _line("build", f"kernels for sm_{arch.replace('.', '')} built or loaded in {time.monotonic() - t0:.1f} s "
                   f"(cache: {cuda_build.cache_root()})")

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference's fp32 matmuls stay fp32
    try:
        failures = _run_checks()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    if failures:
        return _verdict(CHECK_FAILED, f"{failures} check(s) FAILED: the kernels give wrong results on this GPU. "
                                      "Please report this output; meanwhile use the 'reference' backend.")
    try:
        _time_flux_linear()
    except Exception as e:
        return _verdict(CHECK_FAILED, f"the timing run failed ({type(e).__name__}: {e}); please report this output.")
    return _verdict(OK, "the SVDQuant CUDA kernels work on this machine.")


def _toolkit_line() -> bool:
    try:
        home, release, how = cuda_build.find_toolkit()
    except cuda_build.CudaBuildError as e:
        _line("nvcc", f"NOT FOUND: {e}")
        return False
    _line("nvcc", f"{release} at {home} ({how})")
    return True
