#!/bin/bash
# The ComfyUI integration tests on the offline GPU machine, in one call (docs/integration.md).
# Run from the repository root with .comfyui/ (a copy of the ComfyUI checkout) and .whl-comfy/ (wheels
# of what ComfyUI needs beyond the machine's Python) carried next to the working tree:
#   bash tests/integration/device_run.sh [pytest args]
# Without pytest args: the GPU tests first, then the HTTP suite with its ComfyUI server on the GPU
# (test_frontend skips there: no Playwright/Chromium). Logs go to $OUT (else /tmp/svdq-out):
# env.txt, pytest.txt, comfyui-server.log.
# Locally, PYTHON=/path/to/python simulates the machine with another interpreter.
set -o pipefail
OUT=${OUT:-/tmp/svdq-out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=${SVDQ_SITE:-/tmp/site}
STUBS=${SVDQ_STUBS:-/tmp/svdq-stubs}
START=$(date +%s)
[ -f .comfyui/main.py ] || { echo "no .comfyui/main.py: carry .comfyui (docs/integration.md)"; exit 2; }

# 1. The carried wheels whose distribution the machine lacks, or has in an older version (so the
#    machine's torch, numpy, transformers, ... are never shadowed: none of them is carried).
WHEELS=$("$PY" - <<'EOF'
import glob, importlib.metadata as md, sys
from packaging.version import Version
for w in sorted(glob.glob(".whl-comfy/*.whl")):
    name, version = w.rsplit("/", 1)[-1].split("-")[:2]
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have is None or Version(have) < Version(version):
        print(w)
    else:
        print(f"installed already: {name} {have}", file=sys.stderr)
EOF
)
if [ -n "$WHEELS" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $WHEELS || exit
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}

# 2. Stand-ins for the two packages too large to carry, only where the real one is missing
#    (tests/integration/device_stubs/: PyAV, imported by ComfyUI at start for video nodes; the web
#    frontend, whose folder ComfyUI's server wants to serve).
rm -rf "$STUBS"; mkdir -p "$STUBS"
for pkg in av comfyui_frontend_package; do
  "$PY" -c "import $pkg" 2>/dev/null || { cp -r "tests/integration/device_stubs/$pkg" "$STUBS/"; echo "stand-in: $pkg"; }
done
export PYTHONPATH=$PYTHONPATH:$STUBS

export COMFYUI_DIR=$PWD/.comfyui PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  SVDQ_CACHE_DIR=${SVDQ_CACHE_DIR:-/tmp/svdq-cache} MAX_JOBS=${MAX_JOBS:-16} \
  SVDQ_COMFY_SERVER_DEVICE=${SVDQ_COMFY_SERVER_DEVICE:-gpu}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
    torch.cuda.is_available() and torch.cuda.get_device_name())"
  echo "carried wheels installed: $(echo $WHEELS | wc -w)"; "$PY" -m pip list 2>/dev/null; } > "$OUT/env.txt" 2>&1
head -4 "$OUT/env.txt"

# 3. The tests: GPU file first, so that its results come even if the rest runs out of time.
if [ $# -eq 0 ]; then
  set -- tests/integration/test_comfyui_gpu.py tests/integration/test_comfyui.py tests/integration/test_frontend.py
fi
BASETEMP=/tmp/svdq-pytest; rm -rf "$BASETEMP"
timeout ${SVDQ_PYTEST_TIMEOUT:-540} "$PY" -m pytest -v -rs -p no:cacheprovider --durations=12 --basetemp="$BASETEMP" "$@" \
  2>&1 | tee "$OUT/pytest.txt"
RC=$?
LOG=$(find "$BASETEMP" -name comfyui.log 2>/dev/null | head -1)
[ -n "$LOG" ] && cp "$LOG" "$OUT/comfyui-server.log"
echo "pytest rc=$RC, total $(( $(date +%s) - START )) s"
exit $RC
