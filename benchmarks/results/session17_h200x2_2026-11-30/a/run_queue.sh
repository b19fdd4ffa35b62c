# Session 17, call A (nvidia-h200-x2): decode kernel options (hd 64 / 128), the mixed scenarios on the
# current code, decode at 1M (1B) and 128K (8B) through LLMEngine.step, the graph GPU tests.
source .dev_lead/prelude.sh
W=/tmp/s17a; mkdir -p $W; echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
git log --oneline 2>/dev/null | head -1 > $W/code.txt
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -l 5 > $W/smi.csv &
gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 170 python -m benchmarks.probes.decode_kernel_options --head-dim 64 --out $W/decode_options_hd64.json > $W/dko64.log 2>&1; note "dko64 rc=$?"
  timeout 80 python -m benchmarks.probes.decode_kernel_options --head-dim 128 --cases 1:131072,1:1048576,32:1024,1:131072+16:1024 --block-n 64,128 --warps 4,8 --stages 2,3 --waves 2,4 --out $W/decode_options_hd128.json > $W/dko128.log 2>&1; note "dko128 rc=$?"
  timeout 200 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars --profile $P8B --out $W/mixed_long_short_8b.json --step-log $W/mixed_8b_steps.jsonl > $W/mixed8b.log 2>&1; note "mixed 8b rc=$?"
  MNEMOSYNE_TEST_DEVICE=cuda timeout 100 python -m pytest -q -p no:cacheprovider tests/test_mixed_graph.py tests/test_cuda_graphs.py tests/test_kernel_decode.py > $W/gpu_tests.log 2>&1; note "gpu tests rc=$?"
}
gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 120 python -m benchmarks.mixed_long_short --shape llama3.2-1b --long-len 262144 --configs adaptive_lars --profile $P1B --out $W/mixed_long_short_1b.json --step-log $W/mixed_1b_steps.jsonl > $W/mixed1b.log 2>&1; note "mixed 1b rc=$?"
  timeout 150 python -m benchmarks.decode_synthetic_kv --contexts 1000000 --steps 32 --out $W/decode_1b_1m.json > $W/dec1b.log 2>&1; note "decode 1b rc=$?"
  timeout 150 python -m benchmarks.decode_synthetic_kv --shape llama3-8b --contexts 131072 --steps 32 --out $W/decode_8b_128k.json > $W/dec8b.log 2>&1; note "decode 8b rc=$?"
}
gpu0 & gpu1 & wait
note ALLDONE
