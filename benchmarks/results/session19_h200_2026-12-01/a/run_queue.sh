# Session 19, call A (nvidia-h200): the warp-specialized kernel with the round-down split rule:
# GPU tests, whole-model chunk steps (ws vs triton), then the 8B mixed scenario (ws, then triton).
W=/tmp/s19a; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
timeout 90 python -m pytest -m gpu -q tests/test_kernel_chunk_ws.py tests/test_kernel_backend.py > $W/gpu_tests.log 2>&1; note "tests rc=$?"
for K in warp_specialized triton; do
  timeout 110 python -m benchmarks.chunk_sweep --parts 8b --prefixes 131072,524288,900000 --chunks 16,32,64,128,256 --auto-path-only --part-timeout 100 --chunk-kernel $K --out $W/chunk_sweep_8b_$K.json --log $W/chunk_sweep_8b_$K.jsonl > $W/cs8b_$K.log 2>&1; note "cs $K rc=$?"
done
timeout 160 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars --profile $P8B --chunk-kernel warp_specialized --out $W/mixed_long_short_8b_ws.json --step-log $W/mixed_8b_ws_steps.jsonl > $W/mixed8b_ws.log 2>&1; note "mixed ws rc=$?"
timeout 130 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars --profile $P8B --chunk-kernel triton --out $W/mixed_long_short_8b_triton.json --step-log $W/mixed_8b_triton_steps.jsonl > $W/mixed8b_triton.log 2>&1; note "mixed triton rc=$?"
cd $W && gzip -f *.jsonl 2>/dev/null; rm -rf repo
note ALLDONE
