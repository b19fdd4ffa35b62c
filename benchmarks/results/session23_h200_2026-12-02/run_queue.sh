# Session 23 (nvidia-h200, one H200): the commands behind g/-k/, in the order they ran, each from the
# session's working tree at the time (the engine's prefill lane changed between runs; the results
# README, "Twenty-third session", says which version each ran). The prelude (.dev_lead/prelude.sh,
# see the results README) also installed cuda-bindings 13.0.3 (the driver's green-context API).
source .dev_lead/prelude.sh
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
# g/: the probe with the decode lane on a plain stream (all SMs), only the chunk lane on a green context
python -m benchmarks.probes.two_lane_overlap --prefixes "" --chunks 4096 --decode-sms 16,24 --whole-prompt 262144 \
    --no-priority-stream --unrestricted-decodes --out g/two_lane_prompt_256k_unrestricted.json
# h/: the engine's prefill lane (one chunk in flight, 16 SMs free): its tests (on the host's CPU: no
# MNEMOSYNE_TEST_DEVICE=cuda), then the mixed scenario beside mixed batching
python -m pytest -q -x tests/test_prefill_lane.py > h/gpu_tests_prefill_lane.log
python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars_lane,adaptive_lars \
    --prefill-lane-free-sms 16 --profile $P8B --out h/mixed_long_short_8b_lane.json --step-log h/mixed_8b_lane_steps.jsonl --plot
# i/: with a per-chunk SM split chosen from the steps' times (16-64 SMs free; taken out after), its tests first
# (on the host's CPU, as in h/)
python -m pytest -q -x tests/test_prefill_lane.py > i/gpu_tests_prefill_lane.log
python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars_lane \
    --prefill-lane-free-sms 16 --profile $P8B --out i/mixed_long_short_8b_lane_split.json --step-log i/mixed_8b_lane_split_steps.jsonl --plot
# j/: the same with sys.setswitchinterval(0.2 ms) while the lane exists (taken out after)
python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars_lane \
    --prefill-lane-free-sms 16 --profile $P8B --out j/mixed_long_short_8b_lane_switch.json --step-log j/mixed_8b_lane_switch_steps.jsonl --plot
# k/: the committed lane (two chunks in flight, one split; the owner claimed only by schedule_lane then),
# 16 and 24 SMs free
for F in 16 24; do
python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars_lane \
    --prefill-lane-free-sms $F --profile $P8B --out k/mixed_long_short_8b_lane2_free$F.json --step-log k/mixed_8b_lane2_free${F}_steps.jsonl --plot
done
