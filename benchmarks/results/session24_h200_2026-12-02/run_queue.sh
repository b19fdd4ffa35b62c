# Session 24 (nvidia-h200, one H200): the commands behind a/-d/, in the order they ran, each on its own lease
# from the session's working tree at the time (the prefill lane changed between runs; the results README,
# "Twenty-fourth session", says which version each ran). $OUT was the device tool's output folder.

# a/: green-context splits (SM ids, graph replays), the lane's GPU tests, the mixed scenario with the
# per-chunk split (16-32 SMs for the steps)
source .dev_lead/prelude.sh
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
D=$OUT/a; mkdir -p $D
timeout 60 python -m benchmarks.probes.green_context_sms --steps-sms 16,24,32 --out $D/green_context_sms.json 2>&1 | tail -8
MNEMOSYNE_TEST_DEVICE=cuda timeout 200 python -m pytest -q -x tests/test_prefill_lane.py > $D/gpu_tests_prefill_lane.log 2>&1; tail -3 $D/gpu_tests_prefill_lane.log
nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv -lms 100 > $D/smi.csv 2>&1 &
timeout 300 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars_lane \
    --prefill-lane-free-sms 16 --prefill-lane-max-free-sms 32 --profile $P8B --out $D/mixed_long_short_8b_lane_split.json \
    --step-log $D/mixed_8b_lane_split_steps.jsonl --plot > $D/mixed8b_split.log 2>&1; tail -4 $D/mixed8b_split.log
kill %1
python -m benchmarks.step_log_report $D/mixed_8b_lane_split_steps.jsonl --out $D/step_log_report.json 2>&1 | tail -4
gzip $D/*.jsonl

# b/: as a/ with the steps' decode graphs captured per split (on its first SMs); the probe adds eager and green-captured copies
source .dev_lead/prelude.sh
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
D=$OUT/b; mkdir -p $D
timeout 60 python -m benchmarks.probes.green_context_sms --steps-sms 16,24,32 --out $D/green_context_sms.json 2>&1 | tail -8
MNEMOSYNE_TEST_DEVICE=cuda timeout 200 python -m pytest -q -x tests/test_prefill_lane.py > $D/gpu_tests_prefill_lane.log 2>&1; tail -3 $D/gpu_tests_prefill_lane.log
nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv -lms 100 > $D/smi.csv 2>&1 &
timeout 300 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars_lane \
    --prefill-lane-free-sms 16 --prefill-lane-max-free-sms 32 --profile $P8B --out $D/mixed_long_short_8b_lane_split.json \
    --step-log $D/mixed_8b_lane_split_steps.jsonl --plot > $D/mixed8b_split.log 2>&1; tail -4 $D/mixed8b_split.log
kill %1
python -m benchmarks.step_log_report $D/mixed_8b_lane_split_steps.jsonl --out $D/step_log_report.json 2>&1 | tail -4
gzip $D/*.jsonl

# c/: as b/ with the lane's launches paced (at most 2 layers ahead of its device work): the lane's GPU
# tests, the mixed scenario with the per-chunk split (16-32 SMs for the steps)
source .dev_lead/prelude.sh
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
D=$OUT/c; mkdir -p $D
MNEMOSYNE_TEST_DEVICE=cuda timeout 200 python -m pytest -q -x tests/test_prefill_lane.py > $D/gpu_tests_prefill_lane.log 2>&1; tail -3 $D/gpu_tests_prefill_lane.log
timeout 300 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars_lane \
    --prefill-lane-free-sms 16 --prefill-lane-max-free-sms 32 --profile $P8B --out $D/mixed_long_short_8b_lane_split.json \
    --step-log $D/mixed_8b_lane_split_steps.jsonl --plot > $D/mixed8b_split.log 2>&1; tail -4 $D/mixed8b_split.log
python -m benchmarks.step_log_report $D/mixed_8b_lane_split_steps.jsonl --out $D/step_log_report.json 2>&1 | tail -1
gzip $D/*.jsonl

# d/: as c/ with one split (the steps always on 16 SMs beside a chunk: --prefill-lane-max-free-sms 16)
source .dev_lead/prelude.sh
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
D=$OUT/d; mkdir -p $D
timeout 300 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars_lane \
    --prefill-lane-free-sms 16 --prefill-lane-max-free-sms 16 --profile $P8B --out $D/mixed_long_short_8b_lane_16.json \
    --step-log $D/mixed_8b_lane_16_steps.jsonl --plot > $D/mixed8b_16.log 2>&1; tail -4 $D/mixed8b_16.log
python -m benchmarks.step_log_report $D/mixed_8b_lane_16_steps.jsonl --out $D/step_log_report.json 2>&1 | tail -1
gzip $D/*.jsonl

# e/: after d/, the steps' mixed-step graphs captured per split too: the lane's and the graphs' GPU tests
source .dev_lead/prelude.sh; mkdir -p $OUT/e
MNEMOSYNE_TEST_DEVICE=cuda timeout 240 python -m pytest -q -x tests/test_prefill_lane.py tests/test_cuda_graphs.py > $OUT/e/gpu_tests_prefill_lane_graphs.log 2>&1

# simulated/ (on CPU, after e/): the lane in the simulator against c/ and d/
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
R=benchmarks/results/session24_h200_2026-12-02
for r in c/mixed_long_short_8b_lane_split d/mixed_long_short_8b_lane_16; do
python -m benchmarks.simulate_mixed --measured $R/$r.json --profile $P8B --out $R/simulated/$(dirname $r)_$(basename $r).json
done
