# Session 18, call H (nvidia-h200): the warp-specialized kernel's split rule rounded down to one wave:
# NOT RUN TO THE END: the session's device time ran out during this call (limit 217 s); nothing came back. (`auto` then = `warp_specialized` now)
# its GPU tests, then the 8B mixed scenario with --chunk-kernel auto.
W=/tmp/s18h; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
timeout 70 python -m pytest -m gpu -q -x tests/test_kernel_chunk_ws.py > $W/gpu_tests.log 2>&1; note "tests rc=$?"
timeout 140 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars --profile $P8B --chunk-kernel auto --out $W/mixed_long_short_8b_ws.json --step-log $W/mixed_8b_ws_steps.jsonl > $W/mixed8b_ws.log 2>&1; note "mixed ws rc=$?"
cd $W && gzip -f *.jsonl 2>/dev/null; rm -rf repo
note ALLDONE
