# Session 19, call E (nvidia-h200): the 1B serving trace (lars_adaptive, the default) on the current code,
# same command and profile as the eighteenth session's a/ (a second measured run for the simulator's held-out check).
W=/tmp/s19e; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $W/smi.csv &
SMI=$!
timeout 540 python -m benchmarks.serving_trace --shape 1b --rate 0.3 --duration-s 300 --latency-profile $P1B --step-logs --configs lars_adaptive --out $W/1b_trace > $W/st1b.log 2>&1; note "st1b rc=$?"
kill $SMI
cd $W && gzip -f 1b_trace/runs/*.jsonl 1b_trace/runs/*.bench.json smi.csv 2>/dev/null; rm -rf repo
note ALLDONE
