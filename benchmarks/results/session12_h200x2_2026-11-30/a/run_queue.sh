# Session 12, call A (nvidia-h200-x2): the eleventh session's unmeasured changes.
#   setsid nohup bash .dev_lead/s12_daemon.sh > /tmp/s12_daemon.out 2>&1 < /dev/null &
W=/tmp/s12; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
T0=$(date +%s)
note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
note "start $(python -c 'import msgspec, zmq, fastapi; print("deps ok")' 2>&1)"
Q=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu
( nvidia-smi --query-gpu=$Q,clocks_event_reasons.active --format=csv -l 1 > $W/smi.csv 2>&1 ) &
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 560 python -m benchmarks.serving_trace --shape 1b --rate 0.3 --duration-s 300 --latency-profile $P1B --step-logs --configs lars_adaptive --out $W/st1b > $W/st1b.log 2>&1; note "st1b rc=$?"
}
gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 250 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars --profile $P8B --out $W/mixed_long_short_8b.json --step-log $W/mixed_8b_steps.jsonl > $W/mixed8b.log 2>&1; note "mixed 8b rc=$?"
  timeout 150 python -m benchmarks.mixed_long_short --shape llama3.2-1b --long-len 262144 --configs adaptive_lars --profile $P1B --out $W/mixed_long_short_1b.json --step-log $W/mixed_1b_steps.jsonl > $W/mixed1b.log 2>&1; note "mixed 1b rc=$?"
  timeout 100 python -m benchmarks.probes.mixed_step_kernels --shape llama3-8b --cases 32x2420+32:196608,32x2420+64:196608,32x1800+96:131072,32x1100+224:40960,32x1100+512:8192 --out $W/probes > $W/mixed_step_kernels.log 2>&1; note "mixed step kernels rc=$?"
  timeout 100 python -m benchmarks.probes.slow_launches --shape llama3-8b --long-len 32768 --out $W/probes > $W/slow_launches.log 2>&1; note "slow launches rc=$?"
}
gpu0 & gpu1 & wait
note ALLDONE
pkill -x nvidia-smi
