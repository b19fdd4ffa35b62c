# Session 11 (planned): results under /tmp/s11. Run detached on nvidia-h200-x2:
#   setsid nohup bash .dev_lead/s11_daemon.sh > /tmp/s11_daemon.out 2>&1 < /dev/null &
# Then poll with a run call: for i in $(seq 1 10); do sleep 50; grep -q ALLDONE /tmp/s11/progress && break; done
# (never `pgrep -f pytest` from the polling command: it matches itself)
W=/tmp/s11; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
T0=$(date +%s)
note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
Q=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu
( nvidia-smi --query-gpu=$Q,clocks_event_reasons.active --format=csv -l 1 > $W/smi.csv 2>&1 ) &
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 120 python -m benchmarks.probes.uneven_chunk_splits --head-dim 64 --out $W/uneven_chunk_splits_hd64.json > $W/uneven64.log 2>&1; note "uneven64 rc=$?"
  timeout 560 python -m benchmarks.serving_trace --shape 1b --rate 0.3 --duration-s 300 --latency-profile $P1B --step-logs --configs lars_adaptive --out $W/st1b > $W/st1b.log 2>&1; note "st1b rc=$?"
}
gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 120 python -m benchmarks.probes.uneven_chunk_splits --head-dim 128 --cases "2048:1024+64:408064,1024:320+32:350176" --out $W/uneven_chunk_splits_hd128.json > $W/uneven128.log 2>&1; note "uneven128 rc=$?"
  timeout 300 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars --profile $P8B --out $W/mixed_long_short_8b.json --plot > $W/mixed.log 2>&1; note "mixed rc=$?"
  timeout 200 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars --profile $P8B --tbt-slo-quantile 0.98 --out $W/mixed_long_short_8b_q098.json --plot > $W/mixed_q098.log 2>&1; note "mixed q0.98 rc=$?"
  MNEMOSYNE_TEST_DEVICE=cuda timeout 200 python -m pytest -q -p no:cacheprovider tests/test_kernel_backend.py tests/test_mixed_graph.py tests/test_step_log.py tests/test_cudnn_plans.py tests/test_no_recompile.py > $W/gpu_tests_b.log 2>&1; note "gpu tests b rc=$?"
}
gpu0 & gpu1 & wait
note ALLDONE
pkill -x nvidia-smi
# Second call (other GPU budget): 8B trace (timeout 700 needs its own detached run), and
# MNEMOSYNE_TEST_DEVICE=cuda pytest tests/test_exactness.py tests/test_kernel_prefill.py tests/test_kernel_chunk_tma.py (about 8 min on one GPU).
