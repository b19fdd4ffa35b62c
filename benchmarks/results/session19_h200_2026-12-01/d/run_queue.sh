# Session 19, call D (nvidia-h200): the 8B serving trace (lars_adaptive, the default) on the current code,
# same command and profile as the eighteenth session's a/ (a second measured run for the simulator's held-out check).
W=/tmp/s19d; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $W/smi.csv &
SMI=$!
timeout 540 python -m benchmarks.serving_trace --shape 8b --rate 0.12 --duration-s 300 --latency-profile $P8B --step-logs --configs lars_adaptive --out $W/8b_trace > $W/st8b.log 2>&1; note "st8b rc=$?"
kill $SMI
cd $W && gzip -f 8b_trace/runs/*.jsonl 8b_trace/runs/*.bench.json smi.csv 2>/dev/null; rm -rf repo
note ALLDONE
