#!/usr/bin/env bash
# One call on a lent GPU machine (no network): install this package against the machine's own
# torch/triton, then run the GPU tests and/or the benchmark report, writing logs to $OUT.
#   scripts/gpu_session.sh tests [pytest args...]
#   scripts/gpu_session.sh bench [benchmarks.report args...]   (JSON/PNG into $OUT, or --out DIR)
#   scripts/gpu_session.sh suite       every GPU test in parallel groups, then compute-sanitizer
#   scripts/gpu_session.sh train       fused training (issue 17): its GPU tests, then the report's
#                                      train section for ResNet-50 batch 256 bf16 (~8 minutes)
#   scripts/gpu_session.sh round2 [DIR] inference round 2 (issue 18): the new kernels' GPU tests
#                                      with their timings (-s), then the report's layers + e2e
#                                      sections for ResNet-50 batch 256 bf16 with both backends
#                                      and their graphs, and a batch-1 e2e, into DIR (default
#                                      benchmarks/results/round2; ~8 minutes)
#   scripts/gpu_session.sh dist [DIR]   training beyond one GPU (issue 19): the captured training
#                                      step's GPU tests (-s: eager vs graphed step time), the
#                                      distributed and TrainingStep CPU tests on that machine's
#                                      torch, then the report's train section for ResNet-50
#                                      batch 256 bf16 (eager, compile, resnet_fast plain and
#                                      TrainingStep-graphed) into DIR (default
#                                      benchmarks/results/dist19; ~8 minutes). One GPU: no
#                                      multi-GPU figure can be taken there.
#   scripts/gpu_session.sh fp8 [DIR]    fp8 inference (issue 20): the fp8 kernel and quantized
#                                      ResNet-50 GPU tests (-s: bf16 vs fp8 graphed forward),
#                                      then the report's e2e section for ResNet-50 batch 256 bf16
#                                      with the rf_triton_fp8[_graph] variants beside bf16, eager
#                                      and compile, into DIR (default benchmarks/results/fp8;
#                                      ~8 minutes)
# Wheels missing there (nvidia-cutlass, and setuptools>=77 for the editable install, since that
# machine's own setuptools may be older) travel in .whl/ (see README, "On a lent GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# A CUDA_HOME that names no nvcc is an error of the build (not a silent fallback): set the
# conventional location only when it holds one.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if ls .whl/*.whl >/dev/null 2>&1; then
  # Install once per machine: reinstalling rewrites the CUTLASS headers, whose new mtimes make
  # ninja rebuild the CUDA extension (~80 s) in the next process that loads it. A carried
  # setuptools goes to its own folder, used only by the editable install below (pyproject.toml
  # needs setuptools>=77; the build runs without isolation, so nothing is downloaded), so the
  # tests keep the machine's own setuptools, which its torch imports.
  stamp=/tmp/site/.installed-$(ls .whl/*.whl | xargs -n1 basename | sort | md5sum | cut -c1-12)
  if [ ! -e "$stamp" ]; then
    pip_target="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target"
    runtime=$(ls .whl/*.whl | grep -v '/setuptools-' || true)
    tools=$(ls .whl/setuptools-*.whl 2>/dev/null || true)
    mkdir -p /tmp/site
    if [ -n "$runtime" ]; then $pip_target /tmp/site $runtime || exit 1; fi
    if [ -n "$tools" ]; then $pip_target /tmp/build-tools $tools || exit 1; fi
    touch "$stamp"
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
build_path=${PYTHONPATH:-}
[ -d /tmp/build-tools ] && build_path=/tmp/build-tools${PYTHONPATH:+:$PYTHONPATH}
if ! PYTHONPATH=$build_path python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
  echo "editable install failed (see $OUT/install.log); using the checkout on PYTHONPATH" >&2
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
what=${1:-tests}; shift || true
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m resnet_fast.env >"$OUT/env.txt" 2>&1 || echo "python -m resnet_fast.env failed (see $OUT/env.txt)" >&2
case "$what" in
  tests) python3 -m pytest -q -rs tests/gpu "$@" 2>&1 | tee "$OUT/gpu_tests.log" ;;
  bench)
    # --out in the arguments wins over $OUT (argparse takes the last); results named for the
    # repository (--out benchmarks/results/<lease>) also come back under $OUT at the same relative
    # path, since only $OUT leaves the machine.
    dest=$OUT prev=
    for a in "$@"; do
      case "$a" in --out=*) dest=${a#--out=} ;; esac
      [ "$prev" = --out ] && dest=$a
      prev=$a
    done
    python3 -m benchmarks.report --out "$OUT" "$@" 2>&1 | tee -a "$OUT/bench.log"
    rc=${PIPESTATUS[0]}
    case "$dest" in
      /*|"$OUT"|"$OUT"/*) ;;
      *) [ -d "$dest" ] && mkdir -p "$OUT/$dest" && cp -r "$dest/." "$OUT/$dest/" ;;
    esac
    exit "$rc" ;;
  suite) exec scripts/gpu_suite.sh ;;
  train)
    # the checks first (bf16 training steps against float64, a CUDA-graphed step), then the
    # figures: eager AMP, compile, resnet_fast plain and graphed, one step each, in one run
    timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_training_gpu.py "$@" 2>&1 | tee "$OUT/gpu_training_tests.log"
    timeout 330 python3 -m benchmarks.report --out "$OUT" --sections train --budget-s 300 \
      --skip train_compile_max_autotune --backends triton 2>&1 | tee -a "$OUT/bench.log"
    exit "${PIPESTATUS[0]}" ;;
  round2)
    dest=${1:-benchmarks/results/round2}
    mkdir -p "$dest" "$OUT/$dest"
    # the CUTLASS extension builds on the CPU (~80 s on a fresh machine) while the Triton tests
    # run; the measured-auto test (last in its file) and the benchmark wait for it
    timeout 300 python3 -m resnet_fast.build >"$OUT/build.log" 2>&1 &
    # correctness of every new kernel first, with its timing against what it replaces
    timeout 170 python3 -m pytest -q -s -rs -p no:cacheprovider tests/gpu/test_round2_gpu.py \
      tests/gpu/test_graphs_gpu.py 2>&1 | tee "$OUT/round2_tests.log"
    wait  # the build
    # the figures with the defaults (the TMA 1x1 GEMM is off by default: it is checked and timed
    # against conv_bn_act by the tests above, and a converted model runs with it on last)
    timeout 220 python3 -m benchmarks.report --out "$dest" --sections layers e2e --budget-s 200 \
      --backends triton cuda --skip compile_max_autotune 2>&1 | tee -a "$OUT/bench.log"
    rc=${PIPESTATUS[0]}
    timeout 80 python3 -m benchmarks.report --out "$dest/b1" --sections e2e --latency --budget-s 60 \
      --backends triton cuda --skip compile_max_autotune 2>&1 | tee -a "$OUT/bench.log"
    RESNET_FAST_TRITON_TMA=1 timeout 60 python3 -m pytest -q -s -p no:cacheprovider \
      tests/gpu/test_round2_gpu.py -k "tma or converted" 2>&1 | tee -a "$OUT/round2_tests.log"
    cp -r "$dest/." "$OUT/$dest/"
    cp ~/.cache/resnet_fast/choices.json "$OUT/" 2>/dev/null || true
    exit "$rc" ;;
  dist)
    dest=${1:-benchmarks/results/dist19}
    mkdir -p "$dest" "$OUT/$dest"
    timeout 200 python3 -m pytest -q -s -rs -p no:cacheprovider tests/gpu/test_train_graphs_gpu.py \
      2>&1 | tee "$OUT/dist_tests.log"
    # the gloo tests (2 processes) and the staleness logic, on this machine's torch (2.11)
    timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/test_distributed.py \
      tests/test_train_graphs.py 2>&1 | tee -a "$OUT/dist_tests.log"
    timeout 300 python3 -m benchmarks.report --out "$dest" --sections train --budget-s 270 \
      --skip train_compile_max_autotune --backends triton 2>&1 | tee -a "$OUT/bench.log"
    rc=${PIPESTATUS[0]}
    cp -r "$dest/." "$OUT/$dest/"
    exit "$rc" ;;
  fp8)
    dest=${1:-benchmarks/results/fp8}
    mkdir -p "$dest" "$OUT/$dest"
    timeout 200 python3 -m pytest -q -s -rs -p no:cacheprovider tests/gpu/test_fp8_gpu.py \
      2>&1 | tee "$OUT/fp8_tests.log"
    timeout 330 python3 -m benchmarks.report --out "$dest" --sections e2e --budget-s 300 \
      --backends triton --skip compile_max_autotune 2>&1 | tee -a "$OUT/bench.log"
    rc=${PIPESTATUS[0]}
    cp -r "$dest/." "$OUT/$dest/"
    exit "$rc" ;;
  *) echo "unknown: $what" >&2; exit 2 ;;
esac
