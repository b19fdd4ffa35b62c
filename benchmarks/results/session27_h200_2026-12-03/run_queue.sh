# Session 27 (nvidia-h200). Each block is one `run` call, in this order; output under $OUT.
# (.dev_lead/prelude.sh: see the top of benchmarks/results/README.md)

# a/ and b/ (one call, on 02ce70d's code before the hold fix and the confined split plans):
# a/: the decode kernel and the page-aligned (TMA) chunk kernel serving the same decodes as one-token
# chunks, on 16 / 24 confined SMs and on every SM, in CUDA graphs captured on the confined stream
# (32 decodes of 1K / 3K keys, 8B heads); b/: the 8B serving trace with the lane on the FLOP-based
# model of the chunks beside a lane chunk (E_CHUNKS 1.05, planned within LANE_STEP_HEADROOM)
source .dev_lead/prelude.sh
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
A=$OUT/a; mkdir -p $A
timeout 100 python -m benchmarks.probes.confined_decode --sms 16,24,0 --keys 1024,3072 --configs 64:4:3,128:8:2 --budgets auto \
  --tma-configs 64:4:3,64:8:3,128:4:3,128:8:3 --tma-splits 1,2 --out $A/confined_decode_tma.json > $A/probe.log 2>&1
B=$OUT/b; mkdir -p $B; W=/tmp/s27b; mkdir -p $W
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $B/smi.csv & SMI=$!
timeout 480 python -m benchmarks.serving_trace --shape 8b --rate 0.12 --duration-s 300 --latency-profile $P8B \
    --step-logs --configs lars_adaptive_lane --out $W/8b_trace > $B/st8b.log 2>&1
kill $SMI; cp $W/8b_trace/serving_trace.* $B/
cd $W/8b_trace && gzip -f runs/*.jsonl runs/*.bench.json; tar cf $B/runs.tar runs; gzip -f $B/smi.csv

# CPU, after b/: the step log report, the steps' model refit (E_CHUNKS), the simulator against b/ (SIMULATED)
python -m benchmarks.step_log_report $R/b/runs/lars_adaptive_lane.steps.jsonl.gz --out $R/b/step_log_report.json
python -m benchmarks.beside_lane_fit --out $R/fit/beside_lane_fit.json
python -m benchmarks.compare_serving_trace --measured $R/b/serving_trace.json --latency-profile $P8B \
    --out $R/simulated/serving_trace_8b_b_vs_simulated.json

# c/ (on 737ed6b: the hold fix, the lane splits' graphs planned for their SMs): the 8B serving trace again,
# then the mixed-step graph and lane GPU tests (a 60-s limit: 20 passed, the rest not run)
source .dev_lead/prelude.sh
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
C=$OUT/c; mkdir -p $C; W=/tmp/s27c; mkdir -p $W
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $C/smi.csv & SMI=$!
timeout 500 python -m benchmarks.serving_trace --shape 8b --rate 0.12 --duration-s 300 --latency-profile $P8B \
    --step-logs --configs lars_adaptive_lane --out $W/8b_trace > $C/st8b.log 2>&1
kill $SMI; cp $W/8b_trace/serving_trace.* $C/
(cd $W/8b_trace && gzip -f runs/*.jsonl runs/*.bench.json; tar cf $C/runs.tar runs); gzip -f $C/smi.csv
MNEMOSYNE_TEST_DEVICE=cuda timeout 60 python -m pytest -q -x tests/test_mixed_graph.py tests/test_prefill_lane.py -p no:cacheprovider > $C/gpu_tests.log 2>&1

# CPU, after c/ (SIMULATED for the simulator)
python -m benchmarks.step_log_report $R/c/runs/lars_adaptive_lane.steps.jsonl.gz --out $R/c/step_log_report.json
python -m benchmarks.compare_serving_trace --measured $R/c/serving_trace.json --latency-profile $P8B \
    --out $R/simulated/serving_trace_8b_c_vs_simulated.json
