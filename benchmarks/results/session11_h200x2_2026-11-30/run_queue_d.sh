# Session 11, call D: the 8B mixed scenario again (run-to-run spread, gpu0); the same scenario on the 1B shape (gpu1).
W=/tmp/s11d; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
T0=$(date +%s)
note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 250 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars --profile $P8B --out $W/mixed_long_short_8b_repeat.json --plot --step-log $W/mixed_8b_steps.jsonl > $W/mixed8b.log 2>&1; note "mixed 8b rc=$?"
}
gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 250 python -m benchmarks.mixed_long_short --shape llama3.2-1b --long-len 262144 --configs adaptive_lars --profile $P1B --out $W/mixed_long_short_1b.json --plot --step-log $W/mixed_1b_steps.jsonl > $W/mixed1b.log 2>&1; note "mixed 1b rc=$?"
}
gpu0 & gpu1 & wait
note ALLDONE
