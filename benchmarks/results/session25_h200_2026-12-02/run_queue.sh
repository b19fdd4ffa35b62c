# Session 25 (nvidia-h200). Each block is one `run` call, in this order; output under $OUT.

# a/: the 8B serving trace with the prefill lane (lars_adaptive_lane: 16-32 SMs left to the steps),
# same trace, rate and profile as the nineteenth session's d/ (lars_adaptive, mixed batching)
source .dev_lead/prelude.sh
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
A=$OUT/a; mkdir -p $A
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $A/smi.csv & SMI=$!
timeout 570 python -m benchmarks.serving_trace --shape 8b --rate 0.12 --duration-s 300 --latency-profile $P8B \
    --step-logs --configs lars_adaptive_lane --out $A/8b_trace > $A/st8b.log 2>&1; echo "st8b rc=$?"
kill $SMI; tail -5 $A/st8b.log; grep -h "built\|captured\|start-up\|warmed" $A/8b_trace/runs/*.server.log
gzip -f $A/8b_trace/runs/*.jsonl $A/8b_trace/runs/*.bench.json $A/smi.csv

# b/: as a/ after the change: while the lane has an owner, the other long prompts wait for it
# (the steps give them nothing); a/'s runs/ folder did not come back from the device, so the
# runs go through a tar here
source .dev_lead/prelude.sh
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
B=$OUT/b; mkdir -p $B; W=/tmp/s25b; mkdir -p $W
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $B/smi.csv & SMI=$!
timeout 560 python -m benchmarks.serving_trace --shape 8b --rate 0.12 --duration-s 300 --latency-profile $P8B \
    --step-logs --configs lars_adaptive_lane --out $W/8b_trace > $B/st8b.log 2>&1; echo "st8b rc=$?"
kill $SMI; cp $W/8b_trace/serving_trace.* $B/
cd $W/8b_trace && gzip -f runs/*.jsonl runs/*.bench.json; tar cf $B/runs.tar runs; gzip -f $B/smi.csv

# c/: after b/, the lane holds while no split leaves the decodes enough SMs (fewest_sms -> None);
# the 1B mixed scenario with the lane, its first run on the 1B shape (what the last device minutes allowed)
source .dev_lead/prelude.sh
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
C=$OUT/c; mkdir -p $C
timeout 215 python -m benchmarks.mixed_long_short --shape llama3.2-1b --long-len 262144 --configs adaptive_lars_lane \
    --prefill-lane-free-sms 16 --prefill-lane-max-free-sms 32 --profile $P1B --out $C/mixed_long_short_1b_lane.json \
    --step-log $C/mixed_1b_lane_steps.jsonl --plot > $C/mixed1b_lane.log 2>&1
gzip -f $C/*.jsonl
# (same lease) the 1B mixed scenario with mixed batching, for the lane's comparison
timeout 200 python -m benchmarks.mixed_long_short --shape llama3.2-1b --long-len 262144 --configs adaptive_lars \
    --profile $P1B --out $C/mixed_long_short_1b.json --step-log $C/mixed_1b_steps.jsonl --plot > $C/mixed1b.log 2>&1
gzip -f $C/*.jsonl

# d/: the lane's tests on the GPU on this session's code (the engine against HF through the lane, an abort, the steps' stream switch)
source .dev_lead/prelude.sh; mkdir -p $OUT/d
MNEMOSYNE_TEST_DEVICE=cuda timeout 190 python -m pytest -q -x tests/test_prefill_lane.py > $OUT/d/gpu_tests_prefill_lane.log 2>&1

# fit/ and simulated/ (CPU, after d/): the steps' model beside a lane chunk fitted on the step logs, and the simulator
python -m benchmarks.beside_lane_fit --out benchmarks/results/session25_h200_2026-12-02/fit/beside_lane_fit.json
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
R=benchmarks/results/session25_h200_2026-12-02
python -m benchmarks.compare_serving_trace --measured $R/b/serving_trace.json --latency-profile $P8B --out $R/simulated/serving_trace_8b_b_vs_simulated_hold.json
for r in c/mixed_long_short_8b_lane_split d/mixed_long_short_8b_lane_16; do
python -m benchmarks.simulate_mixed --measured benchmarks/results/session24_h200_2026-12-02/$r.json --profile $P8B --out $R/simulated/session24_$(dirname $r)_...json
done
# the *_rule_of_b / *_rule_of_d files: the same with `fewest_sms` returning max(choices) where it returns None (no hold);
# the *_requests_* files: `mnemosyne simulate` with the command in each file, on the trace compare_serving_trace writes
