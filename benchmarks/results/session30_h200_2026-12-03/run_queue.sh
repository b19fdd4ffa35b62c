# Session 30 (nvidia-h200, one H200): the commands behind a/-d/ and simulated/, in the order they ran.
# The prelude (.dev_lead/prelude.sh, see the results README) installs the server's pure-Python
# dependencies from carried wheels and exports PYTHONPATH; d/ also needed fastapi's newer
# dependencies (opentelemetry-api, annotated-doc).

# a/: the two-lane probe with paced decode steps (32 decodes of 1536 keys on 16 SMs, 4096-token chunks on the rest)
source .dev_lead/prelude.sh
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm,clocks.mem,temperature.gpu --format=csv -lms 250 > $OUT/smi.csv & SMI=$!
python -m benchmarks.probes.two_lane_overlap --decode-sms 16 --chunks 4096 --prefixes 131072,229376 --num-chunks 4 \
  --no-priority-stream --decode-periods-ms 0,24,27,30 --out $OUT/pace_chunks.json > $OUT/pace_chunks.log 2>&1
python -m benchmarks.probes.two_lane_overlap --decode-sms 16 --chunks 4096 --prefixes "" --whole-prompt 262144 \
  --no-priority-stream --decode-periods-ms 0,27 --out $OUT/pace_prompt.json > $OUT/pace_prompt.log 2>&1
kill $SMI; gzip $OUT/smi.csv

# b/: one layer's attention per memory layout (the probe's first version: without the engine_exact and exact
# variants), with the engine's TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 and without it
source .dev_lead/prelude.sh
python -m benchmarks.probes.cudnn_layouts --prefixes 131072,229376 --chunks 4096,2048 --out $OUT/cudnn_layouts_avoid1.json
TORCH_CUDNN_SDPA_AVOID_RECOMPILE=0 python -m benchmarks.probes.cudnn_layouts --prefixes 131072,229376 --chunks 4096,2048 \
  --out $OUT/cudnn_layouts_avoid0.json

# c/: on this session's code: the probe with the exact path, the cuDNN GPU tests, the 8B mixed scenario
source .dev_lead/prelude.sh
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
A=$OUT/a; mkdir -p $A
timeout 90 python -m benchmarks.probes.cudnn_layouts --prefixes 131072,229376,230000 --chunks 4096 \
  --out $A/cudnn_layouts.json > $A/probe.log 2>&1
MNEMOSYNE_TEST_DEVICE=cuda timeout 120 python -m pytest -q -x tests/test_cudnn_exact.py tests/test_cudnn_plans.py \
  tests/test_kernel_backend.py -p no:cacheprovider > $A/gpu_tests_cudnn.log 2>&1
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $A/smi.csv & SMI=$!
timeout 330 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars_lane \
    --prefill-lane-free-sms 16 --prefill-lane-max-free-sms 32 --profile $P8B --out $A/mixed_long_short_8b_lane.json \
    --step-log $A/mixed_8b_lane_steps.jsonl > $A/mixed8b_lane.log 2>&1
kill $SMI; gzip -f $A/*.jsonl $A/smi.csv

# d/: the lane's GPU tests, then (next lease) the 8B serving trace with the lane
source .dev_lead/prelude.sh
B=$OUT/b; mkdir -p $B; W=/tmp/s30b; mkdir -p $W
MNEMOSYNE_TEST_DEVICE=cuda timeout 95 python -m pytest -q tests/test_prefill_lane.py -p no:cacheprovider > $B/gpu_tests_lane.log 2>&1
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $B/smi.csv & SMI=$!
timeout 470 python -m benchmarks.serving_trace --shape 8b --rate 0.12 --duration-s 300 --latency-profile $P8B \
    --step-logs --configs lars_adaptive_lane --out $W/8b_trace > $B/st8b.log 2>&1
kill $SMI; cp $W/8b_trace/serving_trace.* $B/
cd $W/8b_trace && gzip -f runs/*.jsonl runs/*.bench.json; tar cf $B/runs.tar runs; gzip -f $B/smi.csv

# On CPU, afterwards (R=benchmarks/results/session30_h200_2026-12-03):
python -m benchmarks.step_log_report $R/c/mixed_8b_lane_steps.jsonl.gz --out $R/c/step_log_report.json
python -m benchmarks.simulate_mixed --measured $R/c/mixed_long_short_8b_lane.json --profile $P8B \
    --out $R/simulated/c_mixed_long_short_8b_lane.json
python -m benchmarks.compare_serving_trace --measured $R/d/serving_trace.json --latency-profile $P8B \
    --out $R/simulated/serving_trace_8b_d_vs_simulated.json
