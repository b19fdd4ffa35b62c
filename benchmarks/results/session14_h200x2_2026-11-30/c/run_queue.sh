# Session 14, call C (nvidia-h200-x2): graph-sized decoding steps, same-lease A/B.
# GPU0: the 1B serving trace with --no-graph-sized-steps (the rule off; call A ran it on, on another lease).
# GPU1: the 1B mixed scenario twice more per rule, alternating.
# GPU0 did not run: argparse took "--no-graph-sized-steps" for an option; it needs --server-args=--no-graph-sized-steps.
W=/tmp/s14c; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
T0=$(date +%s)
note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $W/smi.csv &
gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 530 python -m benchmarks.serving_trace --shape 1b --rate 0.3 --duration-s 300 --latency-profile $P1B --step-logs --configs lars_adaptive --server-args "--no-graph-sized-steps" --out $W/1b_trace_eager_steps > $W/st1b.log 2>&1; note "st1b eager steps rc=$?"
}
gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  for r in 2 3; do
    for c in adaptive_lars_eager_steps adaptive_lars; do
      timeout 100 python -m benchmarks.mixed_long_short --shape llama3.2-1b --long-len 262144 --configs $c --profile $P1B --out $W/mixed_1b_${c}_r$r.json --step-log $W/mixed_1b_${c}_r${r}_steps.jsonl > $W/mixed1b_${c}_r$r.log 2>&1; note "mixed 1b $c r$r rc=$?"
    done
  done
}
gpu0 & G0=$!; gpu1 & G1=$!; wait $G0 $G1
note ALLDONE
cd $W && gzip -f *.jsonl 1b_trace_eager_steps/runs/*.jsonl 2>/dev/null; tar czf /tmp/s14c.tgz --exclude=repo .
