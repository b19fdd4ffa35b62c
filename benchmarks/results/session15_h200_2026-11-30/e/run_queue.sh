# Session 15, call E (nvidia-h200): the arrival-launch probe again with torch.profiler on the launching call.
source .dev_lead/prelude.sh
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
timeout 150 python -m benchmarks.probes.arrival_launch_hold --out $OUT/arrival_launch_hold_1b_torch_profiler.json --latency-profile $P1B --sizes 1206,2384,992,1206 > $OUT/alh2.log 2>&1; echo "rc=$?"
gzip -f $OUT/*.jsonl 2>/dev/null; tail -5 $OUT/alh2.log | cut -c1-300
