# Session 16, call F (nvidia-h200): the final code: GPU tests; arrival probe 1B and 8B (defaults); mixed vs piecewise at 576-992 tokens.
source .dev_lead/prelude.sh
P=/tmp/s16f; mkdir -p $P; echo start > $P/progress
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
timeout 90 python -m pytest -q -x tests/test_mixed_graph.py tests/test_no_recompile.py > $P/gpu_tests.log 2>&1; echo "tests rc=$? $(date +%T)" >> $P/progress
run() { name=$1; shift; timeout 60 python -m benchmarks.probes.arrival_launch_hold --out $P/$name.json --sizes 1206,1372,2384,992,1206,1500,3000,1100,2000,4000 --num-decoding 4 --no-profile "$@" > $P/$name.log 2>&1; echo "$name rc=$? $(date +%T)" >> $P/progress; }
run alh_1b --latency-profile $P1B
run alh_8b --shape llama3-8b --latency-profile $P8B
timeout 70 python -m benchmarks.probes.mixed_graph_kernels --shape llama3.2-1b --no-profiler --cases 992:64,992:4096,768:1024,576:131072 --out $P/mgk_1b > $P/mgk_1b.log 2>&1; echo "mgk_1b rc=$? $(date +%T)" >> $P/progress
gzip -f $P/*.jsonl 2>/dev/null
cd /tmp && tar czf /tmp/s16f.tgz s16f; echo ALLDONE >> $P/progress
