# Session 16, call B (nvidia-h200): A/B of the arrival launch: base, hold before any piecewise plan, mixed graphs to 1024 tokens; 1B and 8B.
source .dev_lead/prelude.sh
P=/tmp/s16b; mkdir -p $P; echo start > $P/progress
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
run() { name=$1; shift; timeout 170 python -m benchmarks.probes.arrival_launch_hold --out $P/$name.json --sizes 1206,1372,2384,992,1206 --num-decoding 4 "$@" > $P/$name.log 2>&1; echo "$name rc=$? $(date +%T)" >> $P/progress; }
run alh_1b_base --latency-profile $P1B
run alh_1b_hold --latency-profile $P1B --hold-before-piecewise
run alh_1b_mixed1024 --latency-profile $P1B --max-mixed-graph-tokens 1024
run alh_8b_base --shape llama3-8b --latency-profile $P8B
run alh_8b_hold --shape llama3-8b --latency-profile $P8B --hold-before-piecewise
run alh_8b_mixed1024 --shape llama3-8b --latency-profile $P8B --max-mixed-graph-tokens 1024
gzip -f $P/*.jsonl 2>/dev/null
cd /tmp && tar czf /tmp/s16b.tgz s16b; echo ALLDONE >> $P/progress
