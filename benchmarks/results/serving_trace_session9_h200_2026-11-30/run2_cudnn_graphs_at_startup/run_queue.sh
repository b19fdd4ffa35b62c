# Session 9, second run (cuDNN graphs built at start-up): results under /tmp/s9c.
# Profiles: .dev_lead/s8_profile_1b.json = serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json;
# .dev_lead/s9_profile_8b.json = run1_8b_1b_mixed/latency_profile_quick_8b.json (measured in run 1).
W=/tmp/s9c; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
T0=$(date +%s)
note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
Q=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu
( nvidia-smi --query-gpu=$Q,clocks_event_reasons.active --format=csv -l 1 > $W/smi.csv 2>&1 ) &
gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 120 python -m benchmarks.probes.cudnn_plan_builds --head-dim 128 --out $W/cudnn_plan_builds_hd128.json > $W/probe128.log 2>&1; note "probe128 rc=$?"
  timeout 560 python -m benchmarks.serving_trace --shape 1b --rate 0.3 --duration-s 300 --latency-profile .dev_lead/s8_profile_1b.json --step-logs --configs lars_adaptive --out $W/st1b > $W/st1b_lars_adaptive.log 2>&1; note "st1b rc=$?"
}
gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 120 python -m benchmarks.probes.cudnn_plan_builds --head-dim 64 --out $W/cudnn_plan_builds_hd64.json > $W/probe64.log 2>&1; note "probe64 rc=$?"
  timeout 560 python -m benchmarks.serving_trace --shape 8b --rate 0.12 --duration-s 300 --latency-profile .dev_lead/s9_profile_8b.json --step-logs --configs lars_adaptive --out $W/st8b > $W/st8b_lars_adaptive.log 2>&1; note "st8b rc=$?"
}
gpu0 & gpu1 & wait
note ALLDONE
pkill -x nvidia-smi
