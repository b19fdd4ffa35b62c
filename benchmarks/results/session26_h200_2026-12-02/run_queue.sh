# Session 26 (nvidia-h200). Each block is one `run` call, in this order; output under $OUT.
# (.dev_lead/prelude.sh: see the top of benchmarks/results/README.md)

# a/: where a prefill-lane chunk's time goes: 4096-token chunks of a 245760-token prompt (8B)
# on every SM, in the lane alone (16 SMs left idle) and in the lane beside 32 decodes (16 SMs),
# torch.profiler over the last chunks; then the lane's GPU tests
source .dev_lead/prelude.sh
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
A=$OUT/a; mkdir -p $A
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $A/smi.csv & SMI=$!
timeout 420 python -m benchmarks.probes.lane_chunk_profile --profile $P8B --out $A/lane_chunk_profile.json > $A/probe.log 2>&1
MNEMOSYNE_TEST_DEVICE=cuda timeout 150 python -m pytest -q -x tests/test_prefill_lane.py > $A/gpu_tests_prefill_lane.log 2>&1
kill $SMI; gzip -f $A/smi.csv

# b/: the cuDNN chunk path's prefix segments against one call over every key (one layer, 8B heads)
source .dev_lead/prelude.sh
B=$OUT/b; mkdir -p $B
timeout 200 python -m benchmarks.probes.cudnn_segments --out $B/cudnn_segments.json > $B/probe.log 2>&1

# c/: the 8B serving trace with the lane (lars_adaptive_lane) on this session's code: the hold,
# the overtaking rule, the decodes' load counting an owner whose last lane chunk still runs
source .dev_lead/prelude.sh
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
C=$OUT/c; mkdir -p $C; W=/tmp/s26c; mkdir -p $W
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $C/smi.csv & SMI=$!
timeout 560 python -m benchmarks.serving_trace --shape 8b --rate 0.12 --duration-s 300 --latency-profile $P8B \
    --step-logs --configs lars_adaptive_lane --out $W/8b_trace > $C/st8b.log 2>&1
kill $SMI; cp $W/8b_trace/serving_trace.* $C/
cd $W/8b_trace && gzip -f runs/*.jsonl runs/*.bench.json; tar cf $C/runs.tar runs; gzip -f $C/smi.csv

# d/: the split-KV decode kernel on 16 / 24 confined SMs (green contexts) and on every SM, under launch
# options and split budgets, in CUDA graphs captured on the confined stream (32 decodes of 1K / 3K keys, 8B heads).
# From here on the carried dependencies were cut to what each call needs (the tree had outgrown the carry):
# d/ the cuda-bindings zip only; e/, f/ also msgspec, pyzmq and sortedcontainers from .dev_lead/minwhl
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "import zipfile; zipfile.ZipFile('.dev_lead/cuda_bindings_driver_only.zip').extractall('/tmp/site')"
export PYTHONPATH=$PWD:/tmp/site
D=$OUT/d; mkdir -p $D
timeout 240 python -m benchmarks.probes.confined_decode --out $D/confined_decode.json > $D/probe.log 2>&1

# e/: after d/, the steps' graphs captured on a lane split run the decode kernel with LAUNCH_16BIT_CONFINED;
# the 8B mixed scenario with the lane (16-32 SMs left to the steps)
python3 -m pip install -q --no-deps --target /tmp/site .dev_lead/minwhl/*.whl
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
E=$OUT/e; mkdir -p $E
timeout 400 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars_lane \
    --prefill-lane-free-sms 16 --prefill-lane-max-free-sms 32 --profile $P8B --out $E/mixed_long_short_8b_lane.json \
    --step-log $E/mixed_8b_lane_steps.jsonl > $E/mixed8b_lane.log 2>&1
gzip -f $E/*.jsonl

# f/: the lane's and the decode kernel's GPU tests on the final code
F=$OUT/f; mkdir -p $F
MNEMOSYNE_TEST_DEVICE=cuda timeout 200 python -m pytest -q tests/test_prefill_lane.py tests/test_kernel_decode.py > $F/gpu_tests_lane_decode.log 2>&1

# CPU, after c/: the step log report and the simulator against c/ (SIMULATED)
R=benchmarks/results/session26_h200_2026-12-02
python -m benchmarks.step_log_report $R/c/runs/lars_adaptive_lane.steps.jsonl.gz --out $R/c/step_log_report.json
python -m benchmarks.compare_serving_trace --measured $R/c/serving_trace.json --latency-profile $P8B \
    --out $R/simulated/serving_trace_8b_c_vs_simulated.json
# the trace of the twenty-fifth session's b/ simulated three ways (one code state each):
# *_no_swap on 4ed8be5 (the last session's), *_overtaking on this session's, *_processor_sharing on a
# variant not kept (LaneState.claim choosing the first candidate by priority at every step and chunk)
python -m benchmarks.compare_serving_trace --measured benchmarks/results/session25_h200_2026-12-02/b/serving_trace.json \
    --latency-profile $P8B --out $R/simulated/serving_trace_8b_session25b_vs_simulated_{no_swap,overtaking,processor_sharing}.json
python -m benchmarks.beside_lane_fit --out $R/fit/beside_lane_fit.json  # after e/: E_KEYS 1.05 -> 1.2
# after the simulator's lane was remodelled (chunks slower only beside steps; the steps' frame and E_CHUNKS):
python -m benchmarks.beside_lane_fit --out $R/fit/beside_lane_fit.json
python -m benchmarks.compare_serving_trace --measured $R/c/serving_trace.json --latency-profile $P8B \
    --out $R/simulated/serving_trace_8b_c_vs_simulated.json
python -m benchmarks.simulate_mixed --measured $R/e/mixed_long_short_8b_lane.json --profile $P8B \
    --out $R/simulated/mixed_8b_lane_e_vs_simulated.json
python -m benchmarks.simulate_mixed --measured benchmarks/results/session24_h200_2026-12-02/c/mixed_long_short_8b_lane_split.json \
    --profile $P8B --out $R/simulated/session24_c_mixed_8b_lane_vs_simulated.json
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
python -m benchmarks.simulate_mixed --measured benchmarks/results/session25_h200_2026-12-02/c/mixed_long_short_1b_lane.json \
    --profile $P1B --out $R/simulated/session25_c_mixed_1b_lane_vs_simulated.json
