# Session 18, call A (nvidia-h200-x2): both serving traces (lars_adaptive, the default) on the current code (prompt-only calibration kind),
# one per GPU, same commands and profiles as the fifteenth session's.
W=/tmp/s18a; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $W/smi.csv &
SMI=$!
(export CUDA_VISIBLE_DEVICES=0; timeout 555 python -m benchmarks.serving_trace --shape 8b --rate 0.12 --duration-s 300 --latency-profile $P8B --step-logs --configs lars_adaptive --out $W/8b_trace > $W/st8b.log 2>&1; note "st8b rc=$?") &
A=$!
(export CUDA_VISIBLE_DEVICES=1; timeout 555 python -m benchmarks.serving_trace --shape 1b --rate 0.3 --duration-s 300 --latency-profile $P1B --step-logs --configs lars_adaptive --out $W/1b_trace > $W/st1b.log 2>&1; note "st1b rc=$?") &
B=$!
wait $A $B; kill $SMI
cd $W && gzip -f 8b_trace/runs/*.jsonl 1b_trace/runs/*.jsonl 2>/dev/null; rm -rf repo
note ALLDONE
