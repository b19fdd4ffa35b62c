# Session 10 (planned): results under /tmp/s10. Run detached on nvidia-h200-x2:
#   setsid nohup bash .dev_lead/s10_daemon.sh > /tmp/s10_daemon.out 2>&1 < /dev/null &
W=/tmp/s10; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
T0=$(date +%s)
note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
Q=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu
( nvidia-smi --query-gpu=$Q,clocks_event_reasons.active --format=csv -l 1 > $W/smi.csv 2>&1 ) &
gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 150 python -m benchmarks.probes.uneven_chunk_splits --head-dim 64 --out $W/uneven_chunk_splits_hd64.json > $W/uneven64.log 2>&1; note "uneven64 rc=$?"
  timeout 560 python -m benchmarks.serving_trace --shape 1b --rate 0.3 --duration-s 300 --latency-profile benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json --step-logs --configs lars_adaptive --out $W/st1b > $W/st1b.log 2>&1; note "st1b rc=$?"
}
gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 150 python -m benchmarks.probes.uneven_chunk_splits --head-dim 128 --cases "2048:1024+64:408064,1024:320+32:350176" --out $W/uneven_chunk_splits_hd128.json > $W/uneven128.log 2>&1; note "uneven128 rc=$?"
  timeout 400 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars --profile benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json --out $W/mixed_long_short_8b.json --plot > $W/mixed.log 2>&1; note "mixed rc=$?"
  MNEMOSYNE_TEST_DEVICE=cuda timeout 330 python -m pytest -q -p no:cacheprovider tests/test_exactness.py tests/test_mixed_graph.py tests/test_cuda_graphs.py tests/test_no_recompile.py tests/test_kernel_backend.py tests/test_cudnn_plans.py tests/test_step_log.py > $W/gpu_tests.log 2>&1; note "gpu tests rc=$?"
}
gpu0 & gpu1 & wait
note ALLDONE
pkill -x nvidia-smi
