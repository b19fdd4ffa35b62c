# Session 13, call B (nvidia-h200-x2): the core exactness suite on the kernel path (float32, GPU);
# a long prompt's arrival without the list copy (1B and 8B mixed scenario); the arrival probe on this host.
W=/tmp/s13b; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
T0=$(date +%s)
note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  MNEMOSYNE_TEST_DEVICE=cuda timeout 540 python -m pytest -q -p no:cacheprovider --durations=15 tests/test_exactness.py > $W/gpu_tests_exactness.log 2>&1; note "exactness rc=$?"
}
gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 120 python -m benchmarks.mixed_long_short --shape llama3.2-1b --long-len 262144 --configs adaptive_lars --profile $P1B --out $W/mixed_long_short_1b.json --step-log $W/mixed_1b_steps.jsonl > $W/mixed1b.log 2>&1; note "mixed 1b rc=$?"
  timeout 60 python -m benchmarks.probes.core_arrival_cost --out $W/core_arrival_cost_h200host.json > $W/arrival.log 2>&1; note "arrival rc=$?"
  MNEMOSYNE_TEST_DEVICE=cuda timeout 150 python -m pytest -q -p no:cacheprovider tests/test_kernel_backend.py tests/test_kvp_merge.py tests/test_no_recompile.py tests/test_request.py > $W/gpu_tests_kernels.log 2>&1; note "gpu tests rc=$?"
  timeout 200 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars --profile $P8B --out $W/mixed_long_short_8b.json --step-log $W/mixed_8b_steps.jsonl > $W/mixed8b.log 2>&1; note "mixed 8b rc=$?"
}
gpu0 & G0=$!; gpu1 & G1=$!; wait $G0 $G1
note ALLDONE
cd $W && gzip -f *.jsonl 2>/dev/null; tar czf /tmp/s13b.tgz --exclude=repo .
