# Session 15, call A (nvidia-h200): the 1B serving trace on the current code (decode-ahead room, ids read into an array),
# graph-sized steps on; call B: the same with them off.
W=/tmp/s15a; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
T0=$(date +%s)
note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $W/smi.csv &
git log --oneline | head -1 > $W/code.txt
gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 540 python -m benchmarks.serving_trace --shape 1b --rate 0.3 --duration-s 300 --latency-profile $P1B --step-logs --configs lars_adaptive --out $W/1b_trace > $W/st1b.log 2>&1; note "st1b rc=$?"
}
gpu1() {
  export CUDA_VISIBLE_DEVICES=0

  timeout 540 python -m benchmarks.serving_trace --shape 1b --rate 0.3 --duration-s 300 --latency-profile $P1B --step-logs --configs lars_adaptive --server-args="--no-graph-sized-steps" --out $W/1b_trace_rule_off > $W/st1b_off.log 2>&1; note "st1b_off rc=$?"
}
gpu0
note ALLDONE
cd $W && gzip -f 1b_trace*/runs/*.jsonl 2>/dev/null; tar czf /tmp/s15a.tgz --exclude=repo .
