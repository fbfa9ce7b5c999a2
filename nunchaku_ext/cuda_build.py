"""Just-in-time build of the CUDA kernels in csrc/ (torch.utils.cpp_extension + ninja).

    from nunchaku_ext import cuda_build
    ext = cuda_build.load()            # builds once per (sources, torch, CUDA, arch), then cached

- Compiled only for the GPU present (e.g. sm_90 on an H100); SVDQ_CUDA_ARCHS="7.5;8.0;8.6;8.9;9.0;12.0"
  (or "all") forces a list, which is how CI proves the all-arch build on a machine without a GPU.
- Cached under $SVDQ_CACHE_DIR, else $XDG_CACHE_HOME/comfyui-svdquant, else ~/.cache/comfyui-svdquant,
  in a folder named by a hash of the sources, torch version, CUDA version, nvcc version and archs.
- An fcntl lock in the cache folder makes a second process wait for the first one's build instead
  of building (or loading a half-written library) at the same time. The kernel releases the lock if
  the builder dies, so a crash never leaves a stale lock behind.
- Every failure raises CudaBuildError with the reason and what to do about it.

Importing this module never touches CUDA or nvcc, so `import nunchaku_ext` works on CPU-only machines.
"""
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Archs the kernels are written and compile-checked for. sm_90 is where they run in our tests
# (H100/H200), each arch's MMA path included, forced (backends/cuda.py: mma_path): sm_75 multiplies
# with s4 m8n8k32, sm_80/86/89 with s4 m16n8k64, sm_90/120 with s8 m16n8k32 (DESIGN.md §4). Other
# GPUs of compute capability >= 7.5 get a native build for their own arch, with a warning that it
# is untested. NVFP4 layers use the block-scaled FP4 MMA on sm_120, which is legal only for the
# arch-specific target: 12.0 is built as compute_120a / sm_120a (ARCH_SPECIFIC). Likewise sm_90's INT4
# GEMM on wgmma (csrc/w4a4_sm90a.cu: wgmma, setmaxnreg) needs sm_90a: 9.0 is built as compute_90a / sm_90a
# (a cubin for exactly sm_90, which is all a 9.0 build ever ran on: no PTX is embedded for any arch).
SUPPORTED_ARCHS = ("7.5", "8.0", "8.6", "8.9", "9.0", "12.0")
ARCH_SPECIFIC = ("9.0", "12.0")
MIN_CAPABILITY = (7, 5)

ARCHS_ENV = "SVDQ_CUDA_ARCHS"
CACHE_ENV = "SVDQ_CACHE_DIR"
VERBOSE_ENV = "SVDQ_BUILD_VERBOSE"  # 1: echo the compiler output, incl. -Xptxas -v register reports

CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("w4a4_ops.cpp", "w4a4_int8.cu", "w4a16_gemv.cu", "w4a4_sm90a.cu")
HEADERS = ("w4a4_int8.h", "w4a16_gemv.h", "w4a4_s4.cuh", "w4a4_nvfp4.cuh", "w4a4_nvfp4_bs.cuh", "w4a4_mlp.h",
           "w4a4_mlp.cuh", "w4a4_sm90a.h")

DEFAULT_CUDA_HOMES = ("/usr/local/cuda",)

_NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas", "-v"]
_CXX_FLAGS = ["-O3"]  # the C++ standard is torch's choice (C++17 for torch 2.11, C++20 for 2.14)

_loaded = {}  # arch tuple -> module


class CudaBuildError(RuntimeError):
    """The kernels cannot be built or loaded here; the message says why and what to do."""


# ------------------------------------------------------------------------------------------------
# Cache folder and lock


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "comfyui-svdquant"


class _FileLock:
    """Exclusive advisory lock on a file (fcntl.flock); released on close or process exit."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is building the SVDQuant CUDA kernels (%s)", self.path)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


# ------------------------------------------------------------------------------------------------
# Archs


def _parse_archs(text: str) -> tuple:
    text = text.strip()
    if text.lower() == "all":
        return SUPPORTED_ARCHS
    archs = []
    for item in re.split(r"[;,\s]+", text):
        if not item:
            continue
        item = item.lower().removeprefix("sm_").removeprefix("sm")
        if re.fullmatch(r"\d+\.\d+", item):
            arch = item
        elif re.fullmatch(r"\d{2,3}", item):  # "90" -> "9.0", "120" -> "12.0"
            arch = f"{item[:-1]}.{item[-1]}"
        else:
            raise CudaBuildError(f"{ARCHS_ENV}: cannot read arch {item!r}; write e.g. '8.6;9.0' or 'all'")
        major, minor = (int(v) for v in arch.split("."))
        if (major, minor) < MIN_CAPABILITY:
            raise CudaBuildError(_below_min_message(f"sm_{major}{minor}"))
        archs.append(f"{major}.{minor}")
    if not archs:
        raise CudaBuildError(f"{ARCHS_ENV} names no arch")
    return tuple(sorted(set(archs), key=lambda a: tuple(int(v) for v in a.split("."))))


def _below_min_message(what: str) -> str:
    supported = ", ".join("sm_" + a.replace(".", "") for a in SUPPORTED_ARCHS)
    return (f"{what} is not supported by the SVDQuant CUDA kernels: they need compute capability 7.5 or "
            f"newer (Turing's 4-bit mma.sync m8n8k32 at least). Supported: {supported}. Use the 'reference' "
            "backend on this GPU (correct but slow).")


_device_archs = {}  # device index -> arch (device queries are cheap but not free on every forward)


def device_arch(device=None) -> str:
    """The arch to build for the given (default: current) CUDA device, or CudaBuildError."""
    import torch

    if torch.cuda.is_available():
        index = torch.cuda.current_device() if device is None else (torch.device(device).index or 0)
        if index in _device_archs:
            return _device_archs[index]
        _device_archs[index] = _query_device_arch(index)
        return _device_archs[index]
    return _query_device_arch(None)


def _query_device_arch(index) -> str:
    import torch

    if not torch.cuda.is_available():
        if not torch.version.cuda:
            raise CudaBuildError(f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of "
                                 "torch to use the 'cuda' backend")
        raise CudaBuildError("no CUDA GPU is visible (torch.cuda.is_available() is False): check the NVIDIA "
                             "driver (nvidia-smi) and CUDA_VISIBLE_DEVICES")
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    if (major, minor) < MIN_CAPABILITY:
        raise CudaBuildError(_below_min_message(f"{name} (sm_{major}{minor})"))
    arch = f"{major}.{minor}"
    if arch not in SUPPORTED_ARCHS:
        log.warning("%s is sm_%d%d, which the SVDQuant kernels were not tested on; building for it natively",
                    name, major, minor)
    return arch


def target_archs(archs=None) -> tuple:
    """archs argument > $SVDQ_CUDA_ARCHS > the current GPU."""
    if archs is not None:
        return _parse_archs(archs if isinstance(archs, str) else ";".join(archs))
    if os.environ.get(ARCHS_ENV):
        return _parse_archs(os.environ[ARCHS_ENV])
    return (device_arch(),)


def _gencode_flags(archs) -> list:
    flags = []
    for arch in archs:
        sm = arch.replace(".", "") + ("a" if arch in ARCH_SPECIFIC else "")
        flags.append(f"-gencode=arch=compute_{sm},code=sm_{sm}")
    return flags


# ------------------------------------------------------------------------------------------------
# Toolchain: find nvcc (system toolkit, or the nvidia-cuda-nvcc wheel) and check its version


def _nvcc_release(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise CudaBuildError(f"cannot run {nvcc}: {e}") from e
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m:
        raise CudaBuildError(f"cannot read the version of {nvcc}: {out.strip()[:200]!r}")
    return f"{m.group(1)}.{m.group(2)}"


def _is_toolkit(home: Path) -> bool:
    return (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file()


def _wheel_toolkits():
    """Roots of pip-installed CUDA compilers: nvidia/cu13 (CUDA 13 wheels: nvcc, headers and
    libraries share one root) and nvidia/cuda_nvcc (CUDA 12 wheels)."""
    seen = set()
    for entry in sys.path:
        for sub in ("nvidia/cu13", "nvidia/cu12", "nvidia/cuda_nvcc"):
            root = Path(entry or ".") / sub
            if (root / "bin" / "nvcc").is_file() and root not in seen:
                seen.add(root)
                yield root


def _wheel_shim(root: Path) -> Path:
    """torch's build links with -L$CUDA_HOME/lib64 -lcudart, which a wheel does not provide (it has
    lib/libcudart.so.13 only; CUDA 12 wheels keep the runtime in a sibling package). Build a
    CUDA_HOME of symlinks that has the usual shape."""
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    shim = cache_root() / f"cuda-home-{digest}"
    lib64 = shim / "lib64"
    if (shim / "bin" / "nvcc").exists() and (lib64 / "libcudart.so").exists():
        return shim
    lib64.mkdir(parents=True, exist_ok=True)
    for item in root.iterdir():
        link = shim / item.name
        if item.name != "lib64" and not link.exists():
            link.symlink_to(item.resolve())
    include = shim / "include"
    if not (include / "cuda_runtime.h").exists():  # CUDA 12 wheels: headers in nvidia/cuda_runtime
        runtime = root.parent / "cuda_runtime"
        if include.is_symlink():
            include.unlink()
        if (runtime / "include" / "cuda_runtime.h").exists():
            include.symlink_to((runtime / "include").resolve())
    candidates = sorted(root.parent.glob("*/lib/libcudart.so*"))
    for lib in candidates:
        target = lib64 / "libcudart.so"
        if not target.exists():
            target.symlink_to(lib.resolve())
        break
    return shim


def _wheel_requirements(torch_cuda: str) -> str:
    """The pip wheels that make a working nvcc for torch's CUDA version. CUDA 13 splits the compiler
    (nvcc's own dependencies: nvidia-nvvm, nvidia-cuda-crt) from CCCL, whose headers cuda_fp16.h
    needs; pin them all to torch's minor so that pip does not mix releases."""
    major = torch_cuda.split(".")[0]
    if int(major) >= 13:
        names = ("nvidia-cuda-nvcc", "nvidia-nvvm", "nvidia-cuda-crt", "nvidia-cuda-cccl")
    else:
        names = (f"nvidia-cuda-nvcc-cu{major}", f"nvidia-cuda-cccl-cu{major}")
    return " ".join(f'"{n}=={torch_cuda}.*"' for n in names)


def find_toolkit():
    """(CUDA_HOME, nvcc release "13.0", how it was found); CudaBuildError if none matches torch."""
    import torch

    torch_cuda = torch.version.cuda
    if not torch_cuda:
        raise CudaBuildError(f"this torch ({torch.__version__}) is a CPU-only build; the 'cuda' backend needs a "
                             "CUDA build of torch")
    torch_major = torch_cuda.split(".")[0]
    fix = (f"install the CUDA {torch_major}.x toolkit (and set CUDA_HOME), or `pip install {_wheel_requirements(torch_cuda)}` "
           "into this Python environment (found automatically)")

    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append((Path(os.environ[var]), f"${var}"))
    nvcc_on_path = shutil.which("nvcc")
    if nvcc_on_path:
        candidates.append((Path(nvcc_on_path).resolve().parent.parent, "nvcc on PATH"))
    candidates.extend((Path(home), home) for home in DEFAULT_CUDA_HOMES)
    candidates.extend((root, "pip wheel nvidia-cuda-nvcc") for root in _wheel_toolkits())

    mismatched = []
    for home, how in candidates:
        if not (home / "bin" / "nvcc").is_file():
            continue
        release = _nvcc_release(str(home / "bin" / "nvcc"))
        if release.split(".")[0] != torch_major:
            mismatched.append(f"{home} (CUDA {release}, {how})")
            continue
        if how.startswith("pip wheel"):
            home = _wheel_shim(home)
            if not any((home / sub / "nv" / "target").exists() for sub in ("include", "include/cccl")):
                mismatched.append(f"{home} (pip nvcc without the CCCL headers: nvidia-cuda-cccl is missing)")
                continue
        if not _is_toolkit(home):
            mismatched.append(f"{home} (no include/cuda_runtime.h, {how})")
            continue
        return home, release, how
    if mismatched:
        raise CudaBuildError(f"torch {torch.__version__} is built with CUDA {torch_cuda}; no CUDA compiler found "
                             f"matches its major version {torch_major} (with its headers): {'; '.join(mismatched)}. "
                             f"Fix: {fix}.")
    raise CudaBuildError(f"no CUDA compiler (nvcc) found, which the kernels need for their first build. Fix: {fix}.")


# ------------------------------------------------------------------------------------------------
# Build


def _source_digest() -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((CSRC_DIR / name).read_bytes())
    h.update(" ".join(_NVCC_FLAGS + _CXX_FLAGS).encode())
    return h.hexdigest()


def build_key(archs, nvcc_release: str) -> str:
    import torch

    h = hashlib.sha256()
    # The gencode flags, not just the archs: they say which archs are built arch-specific (ARCH_SPECIFIC).
    for part in (_source_digest(), torch.__version__, str(torch.version.cuda), nvcc_release,
                 " ".join(_gencode_flags(archs)), sys.version.split()[0]):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def load(archs=None, verbose=None):
    """Build (first time) and import the extension for `archs` (default: the current GPU's arch or
    $SVDQ_CUDA_ARCHS). Returns the module; raises CudaBuildError with an actionable message."""
    archs = target_archs(archs)
    if archs in _loaded:
        return _loaded[archs]
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV, "") not in ("", "0")

    import torch.utils.cpp_extension as cpp_extension

    cuda_home, release, how = find_toolkit()
    key = build_key(archs, release)
    name = f"svdq_cuda_{key}"
    build_dir = cache_root() / "kernels" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    arch_names = ", ".join("sm_" + a.replace(".", "") for a in archs)

    # torch reads the toolkit location from its module global and TORCH_CUDA_ARCH_LIST from the
    # environment; we pass explicit -gencode flags, which make it skip its own arch selection.
    cpp_extension.CUDA_HOME = str(cuda_home)
    os.environ.setdefault("MAX_JOBS", str(max(1, min(8, (os.cpu_count() or 2)))))
    log_path = build_dir / "build.log"

    with _FileLock(build_dir / "build.lock"):
        # torch keeps its own lock file ("lock") in the build folder and waits forever while it exists;
        # one left by a process that was killed mid-build would hang every later start. Under our
        # fcntl lock nobody else is building here, so such a file is stale.
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("removing a stale build lock left by an interrupted build: %s", stale)
            stale.unlink()
        built = any(build_dir.glob(f"{name}*.so"))
        if not built:
            log.warning("building the SVDQuant CUDA kernels for %s with nvcc %s (%s) in %s; the first build takes "
                        "a while (about a minute per arch)", arch_names, release, cuda_home, build_dir)
        t0 = time.monotonic()
        try:
            module = _build_and_import(cpp_extension, name, build_dir, archs, verbose, log_path)
        except CudaBuildError:
            raise
        except Exception as e:  # compile or link error, or the library failed to import
            raise CudaBuildError(f"building the SVDQuant CUDA kernels for {arch_names} failed ({type(e).__name__}). "
                                 f"Full compiler output: {log_path}. Toolkit: {cuda_home} (nvcc {release}, {how}).") from e
        if not built:
            log.warning("built the SVDQuant CUDA kernels in %.1f s (cached in %s)", time.monotonic() - t0, build_dir)
    _loaded[archs] = module
    return module


def _build_and_import(cpp_extension, name, build_dir, archs, verbose, log_path):
    """cpp_extension.load, with the compiler output captured to build.log (it only reaches our
    exception otherwise) and echoed when verbose."""
    import io
    import contextlib

    captured = io.StringIO()
    # ninja's output arrives in the exception (failure) or is printed only with verbose=True; keep
    # verbose=True so ptxas register reports land in the log, and route stdout to our buffer.
    # Subprocess output goes to fd 1 directly, so redirect the file descriptor as well.
    with open(log_path, "w") as log_file, _redirect_fd(1, log_file.fileno()), contextlib.redirect_stdout(captured):
        try:
            return cpp_extension.load(
                name=name,
                sources=[str(CSRC_DIR / s) for s in SOURCES],
                extra_cflags=_CXX_FLAGS,
                extra_cuda_cflags=_NVCC_FLAGS + _gencode_flags(archs),
                extra_include_paths=[str(CSRC_DIR)],
                build_directory=str(build_dir),
                verbose=True,
            )
        except Exception as e:
            log_file.write("\n" + str(e) + "\n")
            raise
        finally:
            log_file.write(captured.getvalue())
            log_file.flush()
            if verbose:
                sys.stderr.write(Path(log_path).read_text() if Path(log_path).exists() else captured.getvalue())


class _redirect_fd:
    def __init__(self, fd, to_fd):
        self.fd, self.to_fd = fd, to_fd

    def __enter__(self):
        sys.stdout.flush()
        self.saved = os.dup(self.fd)
        os.dup2(self.to_fd, self.fd)

    def __exit__(self, *exc):
        sys.stdout.flush()
        os.dup2(self.saved, self.fd)
        os.close(self.saved)


def ptxas_report(archs=None) -> str:
    """The -Xptxas -v lines (registers, spills, shared memory per kernel) of the last build."""
    archs = target_archs(archs)
    _, release, _ = find_toolkit()
    path = cache_root() / "kernels" / f"svdq_cuda_{build_key(archs, release)}" / "build.log"
    if not path.exists():
        return ""
    return "\n".join(l for l in path.read_text().splitlines() if "ptxas info" in l or "bytes stack frame" in l)
