# Session 13, call A (nvidia-h200-x2): the twelfth session's unmeasured changes (decode phase 2 on the merge loop; head-dim-64 cuDNN rule), measured.
W=/tmp/s13a; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
T0=$(date +%s)
note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $W/smi.csv &
gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 520 python -m benchmarks.serving_trace --shape 1b --rate 0.3 --duration-s 300 --latency-profile $P1B --step-logs --configs lars_adaptive --out $W/1b_trace > $W/st1b.log 2>&1; note "st1b rc=$?"
}
gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 60 python -m benchmarks.probes.chunk_launch_kernels --head-dim 64 --cases "32*1:1099,32*1:2419" --out $W/decode_merge_loop_hd64.jsonl > $W/dd64.log 2>&1; note "decode hd64 rc=$?"
  timeout 60 python -m benchmarks.probes.chunk_launch_kernels --head-dim 128 --cases "32*1:1099,32*1:2419,1*1:131071" --out $W/decode_merge_loop_hd128.jsonl > $W/dd128.log 2>&1; note "decode hd128 rc=$?"
  timeout 120 python -m benchmarks.mixed_long_short --shape llama3.2-1b --long-len 262144 --configs adaptive_lars --profile $P1B --out $W/mixed_long_short_1b.json --step-log $W/mixed_1b_steps.jsonl > $W/mixed1b.log 2>&1; note "mixed 1b rc=$?"
  MNEMOSYNE_TEST_DEVICE=cuda timeout 200 python -m pytest -q -p no:cacheprovider tests/test_kernel_decode.py tests/test_cuda_graphs.py tests/test_mixed_graph.py tests/test_no_recompile.py tests/test_kvp_merge.py tests/test_exactness.py tests/test_kernel_backend.py > $W/gpu_tests.log 2>&1; note "gpu tests rc=$?"
  timeout 200 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars --profile $P8B --out $W/mixed_long_short_8b.json --step-log $W/mixed_8b_steps.jsonl > $W/mixed8b.log 2>&1; note "mixed 8b rc=$?"
}
gpu0 & G0=$!; gpu1 & G1=$!; wait $G0 $G1
note ALLDONE
cd $W && gzip -f *.jsonl 1b_trace/runs/*.jsonl 2>/dev/null; tar czf /tmp/s13a.tgz --exclude=repo .
