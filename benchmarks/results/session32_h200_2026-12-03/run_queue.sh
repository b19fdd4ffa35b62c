# Session 32 (nvidia-h200). Each block is one `run` call, in this order; output under $OUT.
# (.dev_lead/prelude.sh: see the top of benchmarks/results/README.md; this session it installed
# only the wheels each call needed: msgspec, pyzmq, sortedcontainers, gguf for a/; the server's
# for b/ and c/, the openai client left out, to stay within the 64 MiB carry limit)
# a/ and b/ ran on this session's code without the per-split scale k(S) of the steps with
# chunks (latency/beside_lane.py `chunk_scales`); c/ with it, before the prompt hold kept the
# owner out of the steps (`LaneHold.FOR_PROMPTS`); d/ on the final code.

# a/: the 8B mixed scenario with the lazy lane launch and the split chooser, then the GPU lane tests
source .dev_lead/prelude.sh
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
A=$OUT/a; mkdir -p $A
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 2 > $A/smi.csv & SMI=$!
date -u > $A/when.txt
timeout 330 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars_lane \
    --prefill-lane-free-sms 16 --prefill-lane-max-free-sms 32 --profile $P8B --out $A/mixed_long_short_8b_lane.json \
    --step-log $A/mixed_8b_lane_steps.jsonl > $A/mixed8b_lane.log 2>&1
echo "mixed rc $?"; date -u >> $A/when.txt
kill $SMI; gzip -f $A/*.jsonl $A/smi.csv
MNEMOSYNE_TEST_DEVICE=cuda timeout 150 python -m pytest -q tests/test_prefill_lane.py tests/test_block_pool_placement.py -p no:cacheprovider > $A/gpu_tests_lane.log 2>&1
echo "lane tests rc $?"; date -u >> $A/when.txt
tail -4 $A/mixed8b_lane.log; tail -3 $A/gpu_tests_lane.log

# b/: the 8B serving trace, the lane holding for the steps' late short prompts (without k(S))
source .dev_lead/prelude.sh
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
B=$OUT/b; mkdir -p $B; W=/tmp/s32b; mkdir -p $W
date -u > $B/when.txt
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $B/smi.csv & SMI=$!
timeout 575 python -m benchmarks.serving_trace --shape 8b --rate 0.12 --duration-s 300 --latency-profile $P8B \
    --step-logs --configs lars_adaptive_lane --out $W/8b_trace > $B/st8b.log 2>&1
echo "trace rc $?"; date -u >> $B/when.txt
kill $SMI; cp $W/8b_trace/serving_trace.* $B/
cd $W/8b_trace && gzip -f runs/*.jsonl runs/*.bench.json; tar cf $B/runs.tar runs; gzip -f $B/smi.csv
tail -5 $B/st8b.log

# c/: the same trace on the committed code (with k(S)): b/'s block with B=$OUT/c and W=/tmp/s32c

# d/: the GPU tests on the final code (the prompt hold keeps the owner out of the steps)
source .dev_lead/prelude.sh
D=$OUT/d; mkdir -p $D
MNEMOSYNE_TEST_DEVICE=cuda timeout 200 python -m pytest -q tests/test_prefill_lane.py tests/test_lane_split.py \
    tests/test_beside_lane.py tests/test_block_pool_placement.py -p no:cacheprovider > $D/gpu_tests_lane.log 2>&1

# On CPU, afterwards (the simulated JSONs on the final code) (R=benchmarks/results/session32_h200_2026-12-03; b/ and c/'s runs.tar unpacked in /tmp/s32b, /tmp/s32c):
python -m benchmarks.step_log_report $R/a/mixed_8b_lane_steps.jsonl.gz --out $R/a/step_log_report.json
python -m benchmarks.step_log_report /tmp/s32b/runs/lars_adaptive_lane.steps.jsonl.gz --out $R/b/step_log_report.json
python -m benchmarks.step_log_report /tmp/s32c/runs/lars_adaptive_lane.steps.jsonl.gz --out $R/c/step_log_report.json
python -m benchmarks.simulate_mixed --measured $R/a/mixed_long_short_8b_lane.json --profile $P8B \
    --out $R/simulated/a_mixed_long_short_8b_lane.json
python -m benchmarks.compare_serving_trace --measured $R/c/serving_trace.json --latency-profile $P8B \
    --out $R/simulated/serving_trace_8b_c_vs_simulated.json
python -m benchmarks.compare_serving_trace --measured benchmarks/results/session30_h200_2026-12-03/d/serving_trace.json \
    --latency-profile $P8B --out $R/simulated/serving_trace_8b_session30d_vs_simulated_split_chooser.json
python -m benchmarks.compare_serving_trace --measured $R/c/serving_trace.json --latency-profile $P8B \
    --device-step-log /tmp/s32c/runs/lars_adaptive_lane.steps.jsonl.gz \
    --out $R/simulated/serving_trace_8b_c_vs_simulated_device_log.json
