# Session 13, call E (nvidia-h200): the mixed scenarios with online calibration at the 0.98 quantile (default 0.9).
W=/tmp/s13e; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
T0=$(date +%s)
note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
timeout 150 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars --tbt-slo-quantile 0.98 --profile $P8B --out $W/mixed_long_short_8b_q098.json --step-log $W/mixed_8b_q098_steps.jsonl > $W/mixed8b.log 2>&1; note "mixed 8b rc=$?"
timeout 90 python -m benchmarks.mixed_long_short --shape llama3.2-1b --long-len 262144 --configs adaptive_lars --tbt-slo-quantile 0.98 --profile $P1B --out $W/mixed_long_short_1b_q098.json --step-log $W/mixed_1b_q098_steps.jsonl > $W/mixed1b.log 2>&1; note "mixed 1b rc=$?"
note ALLDONE
cd $W && gzip -f *.jsonl 2>/dev/null; tar czf /tmp/s13e.tgz --exclude=repo .
