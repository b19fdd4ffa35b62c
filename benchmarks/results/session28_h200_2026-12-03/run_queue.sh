# Session 28 (nvidia-h200). Each block is one `run` call, in this order; output under $OUT.
# (.dev_lead/prelude.sh: see the top of benchmarks/results/README.md)

# a/: the 8B mixed scenario with the lane on d489904 plus the lane's timing in the step log
# (7bc19f6 without its padding), then the lane's and the step log's GPU tests
source .dev_lead/prelude.sh
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
A=$OUT/a; mkdir -p $A
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $A/smi.csv & SMI=$!
timeout 400 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars_lane \
    --prefill-lane-free-sms 16 --prefill-lane-max-free-sms 32 --profile $P8B --out $A/mixed_long_short_8b_lane.json \
    --step-log $A/mixed_8b_lane_steps.jsonl > $A/mixed8b_lane.log 2>&1
kill $SMI; gzip -f $A/*.jsonl $A/smi.csv
MNEMOSYNE_TEST_DEVICE=cuda timeout 150 python -m pytest -q tests/test_prefill_lane.py tests/test_step_log.py -p no:cacheprovider > $A/gpu_tests_lane.log 2>&1

# b/: the same scenario under torch.profiler from the prompt's last two lane chunks to its first token
# (the raw chrome trace, 2.8 MB gzipped, is not kept: b/last_chunk_start_extract.json holds the lane
# thread's CUDA calls around its last chunk's start, made from it)
source .dev_lead/prelude.sh
B=$OUT/b; mkdir -p $B
timeout 450 python -m benchmarks.probes.lane_transition_trace --profile $P8B --out $B/lane_transition_trace.json \
    --trace $B/lane_transition.trace.json.gz > $B/probe.log 2>&1

# c/: a GEMM's first call at a new row count, CUDA_MODULE_LOADING=LAZY and EAGER (fresh processes),
# the 8B shape's four projections, every row count 1-8448
source .dev_lead/prelude.sh
C=$OUT/c; mkdir -p $C
timeout 400 python -m benchmarks.probes.gemm_first_use --out $C/gemm_first_use.json > $C/probe.log 2>&1
gzip -f $C/gemm_first_use.json   # (after its sweep ranges were recomputed: the file's "note")

# d/: a/ again on 7bc19f6 (a prompt's last lane chunk padded to the lane's 4096 rows, each split's
# stream warmed at that row count), then the same GPU tests
source .dev_lead/prelude.sh
D=$OUT/d; mkdir -p $D
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $D/smi.csv & SMI=$!
timeout 400 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars_lane \
    --prefill-lane-free-sms 16 --prefill-lane-max-free-sms 32 --profile $P8B --out $D/mixed_long_short_8b_lane.json \
    --step-log $D/mixed_8b_lane_steps.jsonl > $D/mixed8b_lane.log 2>&1
kill $SMI; gzip -f $D/*.jsonl $D/smi.csv
MNEMOSYNE_TEST_DEVICE=cuda timeout 150 python -m pytest -q tests/test_prefill_lane.py tests/test_step_log.py -p no:cacheprovider > $D/gpu_tests_lane.log 2>&1

# CPU, after the runs
R=benchmarks/results/session28_h200_2026-12-03
for x in a d; do python -m benchmarks.simulate_mixed --measured $R/$x/mixed_long_short_8b_lane.json --profile $P8B --out $R/simulated/${x}_mixed_long_short_8b_lane.json; done
for x in a d; do python -m benchmarks.step_log_report $R/$x/mixed_8b_lane_steps.jsonl.gz --out $R/$x/step_log_report.json; done

# e/: the mixed-step graph and no-recompile GPU tests on 73755e1 (the last session's call ran out of time in them)
source .dev_lead/prelude.sh
E=$OUT/e; mkdir -p $E
MNEMOSYNE_TEST_DEVICE=cuda timeout 230 python -m pytest -q tests/test_mixed_graph.py tests/test_no_recompile.py -p no:cacheprovider > $E/gpu_tests_mixed_graph.log 2>&1
