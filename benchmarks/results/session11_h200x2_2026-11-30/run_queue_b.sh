# Session 11, call B: mixed 8B with per-chunk-bucket calibration (gpu0), GPU exactness + chunk kernel tests (gpu1).
W=/tmp/s11b; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
T0=$(date +%s)
note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 300 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars --profile $P8B --out $W/mixed_long_short_8b.json --plot --step-log $W/mixed_steps.jsonl > $W/mixed.log 2>&1; note "mixed rc=$?"
}
gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  MNEMOSYNE_TEST_DEVICE=cuda timeout 440 python -m pytest -q -p no:cacheprovider tests/test_kernel_chunk_tma.py tests/test_exactness.py > $W/gpu_tests_c.log 2>&1; note "gpu tests c rc=$?"
}
gpu0 & gpu1 & wait
note ALLDONE
