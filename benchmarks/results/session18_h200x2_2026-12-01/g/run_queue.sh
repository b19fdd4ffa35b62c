# Session 18, call G (nvidia-h200): the warp-specialized chunk kernel in the engine:
# (then `--chunk-kernel auto` named what is now `--chunk-kernel warp_specialized`; the default is triton)
# GPU tests, then the 8B mixed scenario with --chunk-kernel auto and with triton, one after the other.
W=/tmp/s18g; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
timeout 120 python -m pytest -m gpu -q tests/test_kernel_chunk_ws.py tests/test_kernel_backend.py > $W/gpu_tests.log 2>&1; note "tests rc=$?"
timeout 175 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars --profile $P8B --chunk-kernel auto --out $W/mixed_long_short_8b_ws.json --step-log $W/mixed_8b_ws_steps.jsonl > $W/mixed8b_ws.log 2>&1; note "mixed ws rc=$?"
timeout 175 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars --profile $P8B --chunk-kernel triton --out $W/mixed_long_short_8b_triton.json --step-log $W/mixed_8b_triton_steps.jsonl > $W/mixed8b_triton.log 2>&1; note "mixed triton rc=$?"
cd $W && gzip -f *.jsonl 2>/dev/null; rm -rf repo
note ALLDONE
