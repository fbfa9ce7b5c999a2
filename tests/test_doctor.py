"""`python -m nunchaku_ext doctor`: a clear verdict and exit status, never a traceback."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def run_doctor(**env):
    return subprocess.run([sys.executable, "-m", "nunchaku_ext", "doctor"], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env={**os.environ, **env})


def test_no_gpu_verdict():
    """With no visible GPU (CPU machine, or GPUs hidden) the doctor says what to do and exits 2."""
    result = run_doctor(CUDA_VISIBLE_DEVICES="")
    out = result.stdout
    assert result.returncode == 2, out + result.stderr
    assert "Traceback" not in out + result.stderr
    assert "torch" in out and "verdict: the SVDQuant CUDA kernels cannot run here" in out
    if torch.version.cuda:
        assert "No CUDA GPU is visible" in out and "CUDA_VISIBLE_DEVICES" in out
    else:
        assert "CPU-only build" in out
    assert "'reference' backend" in out


def test_unknown_command_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "nunchaku_ext", "docter"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice" in result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_doctor_on_gpu():
    result = run_doctor()
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "sm_" in out and "nvcc" in out and "built or loaded in" in out
    checks = [line for line in out.splitlines() if line.strip().startswith("check")]
    assert len(checks) == 8 and all(" ok " in line for line in checks), out
    assert "FLUX.1-dev linear 4096x12288x3072" in out and "x BF16 speed" in out
    assert "verdict: the SVDQuant CUDA kernels work on this machine." in out
