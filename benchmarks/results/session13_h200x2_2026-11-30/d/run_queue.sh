# Session 13, call D (nvidia-h200): decode phase 2 with one head x 32 items per step for batches of up to 4 decodes;
# the mixed scenarios with the long prompt passed as the engine core receives a served one (an int32 array).
W=/tmp/s13d; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
T0=$(date +%s)
note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
timeout 60 python -m benchmarks.probes.chunk_launch_kernels --head-dim 128 --cases "1*1:131071,4*1:32767,8*1:32767,32*1:1099" --out $W/decode_reduce_shape_hd128.jsonl > $W/dd128.log 2>&1; note "decode hd128 rc=$?"
timeout 60 python -m benchmarks.probes.chunk_launch_kernels --head-dim 64 --cases "1*1:131071,32*1:1099" --out $W/decode_reduce_shape_hd64.jsonl > $W/dd64.log 2>&1; note "decode hd64 rc=$?"
MNEMOSYNE_TEST_DEVICE=cuda timeout 90 python -m pytest -q -p no:cacheprovider tests/test_kernel_decode.py tests/test_cuda_graphs.py > $W/gpu_tests.log 2>&1; note "gpu tests rc=$?"
timeout 120 python -m benchmarks.mixed_long_short --shape llama3.2-1b --long-len 262144 --configs adaptive_lars --profile $P1B --out $W/mixed_long_short_1b.json --step-log $W/mixed_1b_steps.jsonl > $W/mixed1b.log 2>&1; note "mixed 1b rc=$?"
timeout 200 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars --profile $P8B --out $W/mixed_long_short_8b.json --step-log $W/mixed_8b_steps.jsonl > $W/mixed8b.log 2>&1; note "mixed 8b rc=$?"
note ALLDONE
cd $W && gzip -f *.jsonl 2>/dev/null; tar czf /tmp/s13d.tgz --exclude=repo .
