# Session 17, call G (nvidia-h200-x2): the mixed scenarios on the final code (prompt-only calibration kind,
# the decode kernel's new launch), 8B on GPU 0, 1B on GPU 1.
source .dev_lead/prelude.sh
W=/tmp/s17g; mkdir -p $W; echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
(export CUDA_VISIBLE_DEVICES=0
  timeout 190 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars --profile $P8B --out $W/mixed_long_short_8b.json --step-log $W/mixed_8b_steps.jsonl > $W/mixed8b.log 2>&1; note "mixed 8b rc=$?"
) &
A=$!
(export CUDA_VISIBLE_DEVICES=1
  timeout 150 python -m benchmarks.mixed_long_short --shape llama3.2-1b --long-len 262144 --configs adaptive_lars --profile $P1B --out $W/mixed_long_short_1b.json --step-log $W/mixed_1b_steps.jsonl > $W/mixed1b.log 2>&1; note "mixed 1b rc=$?"
) &
B=$!
wait $A $B
gzip -f $W/*.jsonl
note ALLDONE
