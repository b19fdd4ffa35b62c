# Session 14, call A (nvidia-h200-x2): graph-sized decoding steps (adaptive chunks: no eager step while requests decode).
# GPU0: the 1B serving trace (same trace and profile as sessions 10-13). GPU1: the mixed scenarios, new rule then old rule.
W=/tmp/s14a; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
T0=$(date +%s)
note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $W/smi.csv &
gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 530 python -m benchmarks.serving_trace --shape 1b --rate 0.3 --duration-s 300 --latency-profile $P1B --step-logs --configs lars_adaptive --out $W/1b_trace > $W/st1b.log 2>&1; note "st1b rc=$?"
}
gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  for c in adaptive_lars adaptive_lars_eager_steps; do
    timeout 200 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs $c --profile $P8B --out $W/mixed_8b_$c.json --step-log $W/mixed_8b_${c}_steps.jsonl > $W/mixed8b_$c.log 2>&1; note "mixed 8b $c rc=$?"
  done
  for c in adaptive_lars adaptive_lars_eager_steps; do
    timeout 100 python -m benchmarks.mixed_long_short --shape llama3.2-1b --long-len 262144 --configs $c --profile $P1B --out $W/mixed_1b_$c.json --step-log $W/mixed_1b_${c}_steps.jsonl > $W/mixed1b_$c.log 2>&1; note "mixed 1b $c rc=$?"
  done
}
gpu0 & G0=$!; gpu1 & G1=$!; wait $G0 $G1
note ALLDONE
cd $W && gzip -f *.jsonl 1b_trace/runs/*.jsonl 2>/dev/null; tar czf /tmp/s14a.tgz --exclude=repo .
