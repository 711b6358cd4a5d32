#!/usr/bin/env bash
# One call on a lent GPU machine (no network): install this package against the machine's own
# torch/triton, then run the GPU tests and/or the benchmark report, writing logs to $OUT.
#   scripts/gpu_session.sh tests [pytest args...]
#   scripts/gpu_session.sh bench [benchmarks.report args...]
#   scripts/gpu_session.sh suite       every GPU test in parallel groups, then compute-sanitizer
# Wheels missing there (nvidia-cutlass) travel in .whl/ (see README, "On a lent GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if ls .whl/*.whl >/dev/null 2>&1; then
  # Install once per machine: reinstalling rewrites the CUTLASS headers, whose new mtimes make
  # ninja rebuild the CUDA extension (~80 s) in the next process that loads it.
  stamp=/tmp/site/.installed-$(ls .whl/*.whl | xargs -n1 basename | sort | md5sum | cut -c1-12)
  if [ ! -e "$stamp" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    touch "$stamp"
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
what=${1:-tests}; shift || true
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
case "$what" in
  tests) python3 -m pytest -q -rs tests/gpu "$@" 2>&1 | tee "$OUT/gpu_tests.log" ;;
  bench) python3 -m benchmarks.report --out "$OUT" "$@" 2>&1 | tee -a "$OUT/bench.log" ;;
  suite) exec scripts/gpu_suite.sh ;;
  *) echo "unknown: $what" >&2; exit 2 ;;
esac
