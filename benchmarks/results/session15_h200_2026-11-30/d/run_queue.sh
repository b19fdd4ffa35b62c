# Session 15, call D (nvidia-h200): the arrival-launch probe (1B, as the serving trace's server).
source .dev_lead/prelude.sh
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
timeout 230 python -m benchmarks.probes.arrival_launch_hold --out $OUT/arrival_launch_hold_1b.json --latency-profile $P1B --sizes 1206,1372,2384,992,1206 > $OUT/alh.log 2>&1; echo "rc=$?"
gzip -f $OUT/*.jsonl 2>/dev/null; tail -8 $OUT/alh.log | cut -c1-600
