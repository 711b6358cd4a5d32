#!/usr/bin/env bash
# Every GPU test in one short call (run through `scripts/gpu_session.sh suite`, which installs
# the package first). Nothing here is timed, so the groups share the GPU: the CUDA extension
# builds on the CPU while the Triton groups run, its tests follow, then compute-sanitizer
# (memcheck over every CUDA kernel config, racecheck over one). `make gpu-test` runs the same
# tests one after another.
# Writes $OUT/gpu_tests.log (each group's pytest output, in order), $OUT/sanitizer.log and
# $OUT/build.log. SUITE_S (default 480) bounds the whole run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
LOGS=$(mktemp -d)
end=$(( $(date +%s) + ${SUITE_S:-480} ))
# seconds left, at least 1: `timeout 0` would mean no limit at all
left() { local s=$(( end - $(date +%s) )); echo $(( s > 1 ? s : 1 )); }

group() {  # name, pytest args...
  local name=$1; shift
  local t0=$(date +%s)
  timeout "$(left)" python3 -m pytest -q -rs -p no:cacheprovider --durations=5 "$@" >"$LOGS/$name.log" 2>&1
  echo "[$name] exit $? after $(( $(date +%s) - t0 )) s" | tee -a "$LOGS/$name.log" >>"$LOGS/summary"
}

M=tests/gpu/test_models_gpu.py
(
  t0=$(date +%s)
  timeout "$(left)" python3 -m resnet_fast.build >"$OUT/build.log" 2>&1
  echo "[build] exit $? after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.log" >>"$LOGS/summary"
  # the extension must not carry its own copy of libstdc++'s numeric ostream code (see
  # csrc/bindings.cpp, "Message text")
  for so in $(find ~/.cache/torch_extensions -name 'resnet_fast_cuda*.so' 2>/dev/null); do
    echo "$so: $(nm -C --defined-only "$so" | grep -c -E '_M_insert<|num_put<|locale::id') libstdc++ stream symbols defined" >>"$OUT/build.log"
  done
  group cuda tests/gpu/test_cuda_gpu.py &
  group models_cuda "$M" -k "cuda and not triton" &
  group ops_autograd tests/gpu/test_ops_autograd_gpu.py &  # backward, add_relu joins, fused AdamW
  group training tests/gpu/test_training_gpu.py &        # fused training: bf16/fp16/fp32, CUDA graph
  group train_graphs tests/gpu/test_train_graphs_gpu.py &  # TrainingStep: captured step, staleness
  wait
) &
group triton tests/gpu/test_triton_gpu.py &
group models_triton_bf16 "$M" -k "triton and bfloat16" &
group models_triton_fp16 "$M" -k "triton and float16 and not bfloat16" &
group models_triton_fp32 "$M" -k "triton and float32" &
group models_triton_graphs "$M" -k "triton and not float" &
group models_preact "$M" -k "preactivation" &   # timm resnetv2_50 on triton, bf16 and fp16
group round2 tests/gpu/test_round2_gpu.py tests/gpu/test_graphs_gpu.py &  # stem, pool, TMA, graphs
group fp8 tests/gpu/test_fp8_gpu.py &               # e4m3 conv kernel, quantized ResNet-50
wait

{
  for tool in memcheck racecheck; do
    extra=(); [ $tool = racecheck ] && extra=(--no-tune)
    echo "== compute-sanitizer --tool $tool python3 tests/gpu/sanitize_block.py ${extra[*]}"
    t0=$(date +%s)
    timeout "$(left)" compute-sanitizer --tool $tool --error-exitcode 9 python3 tests/gpu/sanitize_block.py "${extra[@]}" 2>&1 | tail -40
    echo "[sanitizer $tool] exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
  done
} >"$OUT/sanitizer.log" 2>&1
grep '^\[sanitizer' "$OUT/sanitizer.log" >>"$LOGS/summary"

for f in triton models_triton_bf16 models_triton_fp16 models_triton_fp32 models_triton_graphs models_preact round2 fp8 ops_autograd training train_graphs cuda models_cuda; do
  echo "=================== $f"; cat "$LOGS/$f.log" 2>/dev/null
done >"$OUT/gpu_tests.log"
echo "=== summary"; cat "$LOGS/summary"
for f in "$LOGS"/*.log; do tail -n 3 "$f"; done
! grep -q -E 'exit [1-9]' "$LOGS/summary"
