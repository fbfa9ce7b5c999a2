#!/bin/bash
# One device call: environment, build (with the -Xptxas -v report), GPU test suite, benchmark.
# Usage on the GPU machine (repo root): bash bench/gpu_suite.sh [pytest args, e.g. -m "not build"]
# (logs under $OUT, or /tmp/svdq-out)
set -o pipefail
OUT=${OUT:-/tmp/svdq-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} SVDQ_CACHE_DIR=${SVDQ_CACHE_DIR:-/tmp/svdq-cache}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvcc --version | tail -2;
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_capability())"; } 2>&1 | tee "$OUT/env.txt"
START=$(date +%s)
python3 -c "
import logging, time; logging.basicConfig(level=logging.INFO)
from nunchaku_ext import cuda_build
t = time.time(); cuda_build.load(); print(f'build+load {time.time()-t:.1f} s')
print(cuda_build.ptxas_report())" 2>&1 | tee "$OUT/build.txt"
# every test file: the GPU ones run, the CPU ones run too (the spec on the GPU's torch)
python3 -m pytest -q -rs --durations=8 -p no:cacheprovider --ignore=tests/integration tests "$@" 2>&1 | tee "$OUT/pytest.txt"
echo "pytest rc=$?"
python3 -m nunchaku_ext doctor 2>&1 | tee "$OUT/doctor.txt"
python3 bench/bench_w4a4.py 2>&1 | tee "$OUT/bench.txt"
python3 bench/bench_w4a4.py --shapes 4096x12288x3072 2>&1 | tail -1 | tee -a "$OUT/bench.txt"  # the same shape again: run-to-run spread
python3 bench/bench_w4a16.py 2>&1 | tee -a "$OUT/bench.txt"
echo "total $(( $(date +%s) - START )) s"
