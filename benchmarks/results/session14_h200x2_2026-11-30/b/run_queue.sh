# Session 14, call B (nvidia-h200-x2): the 8B serving trace on the current code (last measured in the seventh session):
# GPU0 lars_adaptive (the default, graph-sized steps), GPU1 fcfs_fixed2048, same trace, same profile.
W=/tmp/s14b; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
T0=$(date +%s)
note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $W/smi.csv &
run() {  # $1 = GPU, $2 = config
  CUDA_VISIBLE_DEVICES=$1 timeout 540 python -m benchmarks.serving_trace --shape 8b --rate 0.12 --duration-s 300 --latency-profile $P8B --step-logs --configs $2 --out $W/8b_trace_$2 > $W/st8b_$2.log 2>&1; note "st8b $2 rc=$?"
}
run 0 lars_adaptive & G0=$!; run 1 fcfs_fixed2048 & G1=$!; wait $G0 $G1
note ALLDONE
cd $W && gzip -f 8b_trace_*/runs/*.jsonl 2>/dev/null; tar czf /tmp/s14b.tgz --exclude=repo .
