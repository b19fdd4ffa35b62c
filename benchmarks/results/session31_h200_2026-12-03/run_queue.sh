# Session 31 (nvidia-h200). Each block is one `run` call, in this order; output under $OUT.
# (.dev_lead/prelude.sh: see the top of benchmarks/results/README.md)

# a/: one layer's lane-chunk ops on every SM and on the lane's 116 SMs (graphs built on either
# stream, alone and beside a decode lane), then where the engine's lane chunks' time goes
# (torch.profiler over the last chunks of a 245760-token prompt, alone and beside 32 decodes)
source .dev_lead/prelude.sh
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
A=$OUT/a; mkdir -p $A
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 2 > $A/smi.csv & SMI=$!
timeout 150 python -m benchmarks.probes.lane_ops --out $A/lane_ops.json > $A/lane_ops.log 2>&1
timeout 330 python -m benchmarks.probes.lane_chunk_profile --profile $P8B --phases lane_alone,lane_beside \
    --free-sms 16 --max-free-sms 32 --out $A/lane_chunk_profile.json > $A/profile.log 2>&1
kill $SMI; gzip -f $A/smi.csv

# b/: the 8B mixed scenario with best-fit block placement (the long prompt in one run of blocks),
# then lane_ops again (this lease's speed)
source .dev_lead/prelude.sh
B=$OUT/b; mkdir -p $B
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 2 > $B/smi.csv & SMI=$!
timeout 330 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars_lane \
    --prefill-lane-free-sms 16 --prefill-lane-max-free-sms 32 --profile $P8B --out $B/mixed_long_short_8b_lane.json \
    --step-log $B/mixed_8b_lane_steps.jsonl > $B/mixed8b_lane.log 2>&1
timeout 120 python -m benchmarks.probes.lane_ops --out $B/lane_ops.json > $B/lane_ops.log 2>&1
kill $SMI; gzip -f $B/*.jsonl $B/smi.csv

# c/: the layer's GEMMs on the lane's SMs with cuBLAS told of the split (torch's SM carveout), and on cuBLASLt
source .dev_lead/prelude.sh
C=$OUT/c; mkdir -p $C
G=qkv,o,gate_up,down; ONLY=engine_exact,$G,${G//,/_carveout,}_carveout,${G//,/_lt_carveout,}_lt_carveout
timeout 200 python -m benchmarks.probes.lane_ops --repeats 9 --only $ONLY --out $C/lane_ops_carveout.json > $C/lane_ops_carveout.log 2>&1

# d/: b/ again with the split chosen for the decodes within LANE_DECODES_HEADROOM (0.95) of the target
# (the same commands, output under $OUT/d)

# e/: the 8B serving trace (lars_adaptive_lane) on d/'s code: killed by its 500-s timeout after the
# trace's 300 s (the server's start-up took 168 s), before the client wrote its results; the
# server's step log and log are kept
source .dev_lead/prelude.sh
E=$OUT/e; mkdir -p $E; W=/tmp/s31e; mkdir -p $W
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $E/smi.csv & SMI=$!
timeout 500 python -m benchmarks.serving_trace --shape 8b --rate 0.12 --duration-s 300 --latency-profile $P8B \
    --step-logs --configs lars_adaptive_lane --out $W/8b_trace > $E/st8b.log 2>&1
kill $SMI; cd $W/8b_trace && gzip -f runs/*.jsonl; tar cf $E/runs.tar runs; gzip -f $E/smi.csv

# On CPU, afterwards (R=benchmarks/results/session31_h200_2026-12-03):
python -m benchmarks.step_log_report $R/b/mixed_8b_lane_steps.jsonl.gz --out $R/b/step_log_report.json
python -m benchmarks.step_log_report $R/d/mixed_8b_lane_steps.jsonl.gz --out $R/d/step_log_report.json
python -m benchmarks.simulate_mixed --measured $R/d/mixed_long_short_8b_lane.json --profile $P8B \
    --out $R/simulated/d_mixed_long_short_8b_lane.json
# the same against b/ with LANE_DECODES_HEADROOM = 0.9 (b/'s code) and 0.95 (d/'s code):
python -m benchmarks.simulate_mixed --measured $R/b/mixed_long_short_8b_lane.json --profile $P8B \
    --out $R/simulated/b_mixed_long_short_8b_lane_headroom{090,095}.json

# f/ (run before the CPU steps above; the last 240 s of device time): the GPU tests of the cuDNN path
# and of the lane, each cut by its time limit (45 s / 50 s with the start-up): 24 and 12 passed, none failed
source .dev_lead/prelude.sh
F=$OUT/f; mkdir -p $F
MNEMOSYNE_TEST_DEVICE=cuda timeout 45 python -m pytest -q tests/test_cudnn_exact.py tests/test_cudnn_plans.py tests/test_kernel_backend.py -p no:cacheprovider > $F/gpu_tests_cudnn.log 2>&1
MNEMOSYNE_TEST_DEVICE=cuda timeout 50 python -m pytest -q tests/test_prefill_lane.py tests/test_block_pool_placement.py -p no:cacheprovider > $F/gpu_tests_lane.log 2>&1
