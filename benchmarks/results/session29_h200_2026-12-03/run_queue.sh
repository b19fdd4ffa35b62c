# Session 29 (nvidia-h200). Each block is one `run` call, in this order; output under $OUT.
# (.dev_lead/prelude.sh: see the top of benchmarks/results/README.md)

# a/: how fast a few SMs can read HBM (benchmarks/probes/sm_read_ceiling.py), then the decode
# kernel on 16 / 24 / every SM as the engine launched it on a lane split (64:4:3) and on every SM
source .dev_lead/prelude.sh
A=$OUT/a; mkdir -p $A
timeout 300 python -m benchmarks.probes.sm_read_ceiling --out $A/sm_read_ceiling.json > $A/probe.log 2>&1
timeout 120 python -m benchmarks.probes.confined_decode --sms 16,24,0 --keys 3072 --configs 64:4:3,128:8:2 --budgets auto \
    --out $A/confined_decode.json > $A/confined.log 2>&1

# b/: 45 launch options of the decode kernel (block_n 16/32/64 x 1/2/4 warps x 1-6 stages) and 10 of
# the page-aligned chunk kernel serving the same decodes, on 16 SMs, 32 x 3072 keys
source .dev_lead/prelude.sh
B=$OUT/b; mkdir -p $B
CFGS=$(python -c "print(','.join(f'{n}:{w}:{s}' for n in (16,32,64) for w in (1,2,4) for s in (1,2,3,4,6)))")
timeout 400 python -m benchmarks.probes.confined_decode --sms 16 --keys 3072 --configs $CFGS --budgets auto,x4 \
  --tma-configs 64:4:2,64:4:4,64:4:6,64:2:3,64:2:4,64:2:6,64:1:3,64:1:4,128:4:2,128:4:4 --tma-splits 1,2 \
  --out $B/confined_decode_wide.json > $B/confined.log 2>&1

# c/: the decode kernel with TMA boxes, every tile masked (the first version of 7b86b88), its launch
# options on 16 / 24 / every SM, the 8B mixed scenario on it, the decode kernel's GPU tests
# d/: the same on 7b86b88's kernel (only a work item's first and last tiles masked), plus the lane's GPU tests
source .dev_lead/prelude.sh
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
D=$OUT/d; mkdir -p $D
timeout 110 python -m benchmarks.probes.confined_decode --sms 16,24,0 --keys 1024,3072 \
  --configs 64:4:3,128:8:2,64:1:3:tma,64:1:4:tma,64:2:3:tma,64:1:2:tma,32:1:3:tma --budgets auto \
  --tma-configs 64:1:3 --tma-splits 1 --out $D/confined_decode_boxes.json > $D/confined.log 2>&1
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $D/smi.csv & SMI=$!
timeout 330 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars_lane \
    --prefill-lane-free-sms 16 --prefill-lane-max-free-sms 32 --profile $P8B --out $D/mixed_long_short_8b_lane.json \
    --step-log $D/mixed_8b_lane_steps.jsonl > $D/mixed8b_lane.log 2>&1
kill $SMI; gzip -f $D/*.jsonl $D/smi.csv
MNEMOSYNE_TEST_DEVICE=cuda timeout 80 python -m pytest -q tests/test_kernel_decode.py -p no:cacheprovider > $D/gpu_tests_decode.log 2>&1
MNEMOSYNE_TEST_DEVICE=cuda timeout 120 python -m pytest -q tests/test_prefill_lane.py -p no:cacheprovider > $D/gpu_tests_lane.log 2>&1

# e/: the GPU tests on the committed code (7b86b88): the decode kernel's (cut by its 70-s limit on a
# cold machine after 35 of 37, none failed; all 37 passed in d/), the mixed-step graphs and no-recompile
source .dev_lead/prelude.sh
E=$OUT/e; mkdir -p $E
MNEMOSYNE_TEST_DEVICE=cuda timeout 70 python -m pytest -q tests/test_kernel_decode.py -p no:cacheprovider > $E/gpu_tests_decode.log 2>&1
MNEMOSYNE_TEST_DEVICE=cuda timeout 160 python -m pytest -q tests/test_mixed_graph.py tests/test_no_recompile.py -p no:cacheprovider > $E/gpu_tests_mixed_graph.log 2>&1

# CPU, after the runs
R=benchmarks/results/session29_h200_2026-12-03
python -m benchmarks.beside_lane_fit --out $R/fit/beside_lane_fit.json > $R/fit/beside_lane_fit.log
python -m benchmarks.simulate_mixed --measured $R/d/mixed_long_short_8b_lane.json --profile $P8B --out $R/simulated/d_mixed_long_short_8b_lane.json
python -m benchmarks.step_log_report $R/d/mixed_8b_lane_steps.jsonl.gz --out $R/d/step_log_report.json
