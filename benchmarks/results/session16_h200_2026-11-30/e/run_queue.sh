# Session 16, call E (nvidia-h200): GPU tests of the decode kernel's padding exit and the mixed graphs' split variants; step cost mixed vs piecewise; arrival probe 512 / 1024.
source .dev_lead/prelude.sh
P=/tmp/s16e; mkdir -p $P; echo start > $P/progress
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
timeout 150 python -m pytest -q tests/test_kernel_decode.py tests/test_mixed_graph.py > $P/gpu_tests.log 2>&1; echo "tests rc=$? $(date +%T)" >> $P/progress
timeout 130 python -m benchmarks.probes.mixed_graph_kernels --shape llama3.2-1b --max-mixed-graph-tokens 1024 --cases 992:64,992:4096,992:131072,512:64,352:1024,32:1024,32:131072 --out $P/mgk_1b > $P/mgk_1b.log 2>&1; echo "mgk_1b rc=$? $(date +%T)" >> $P/progress
run() { name=$1; shift; timeout 100 python -m benchmarks.probes.arrival_launch_hold --out $P/$name.json --sizes 1206,1372,2384,992,1206,1500,3000,1100,2000,4000 --num-decoding 4 --no-profile "$@" > $P/$name.log 2>&1; echo "$name rc=$? $(date +%T)" >> $P/progress; }
run alh_1b_512 --latency-profile $P1B
run alh_1b_1024 --latency-profile $P1B --max-mixed-graph-tokens 1024
timeout 150 python -m benchmarks.probes.mixed_graph_kernels --shape llama3-8b --max-mixed-graph-tokens 1024 --cases 992:64,992:32768,512:64,352:1024,32:131072 --out $P/mgk_8b > $P/mgk_8b.log 2>&1; echo "mgk_8b rc=$? $(date +%T)" >> $P/progress
run alh_8b_512 --shape llama3-8b --latency-profile $P8B
gzip -f $P/*.jsonl 2>/dev/null
cd /tmp && tar czf /tmp/s16e.tgz s16e; echo ALLDONE >> $P/progress
