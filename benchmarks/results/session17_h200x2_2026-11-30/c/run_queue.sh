# Session 17, call C (nvidia-h200-x2): decode kernel options timed in CUDA graphs (old and new launch at
# head dim 64), decode through LLMEngine.step with the new launch, the decode/graph GPU tests.
source .dev_lead/prelude.sh
W=/tmp/s17c; mkdir -p $W; echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
(export CUDA_VISIBLE_DEVICES=0
  timeout 100 python -m benchmarks.probes.decode_kernel_options --head-dim 64 --block-n 64,128,256 --warps 2,4,8 --stages 2,3 --waves 2,4,8 --out $W/decode_options_hd64.json > $W/dko64.log 2>&1; note "dko64 rc=$?"
  timeout 60 python -m benchmarks.probes.decode_kernel_options --head-dim 128 --cases 1:131072,1:1048576,32:1024,1:131072+16:1024 --block-n 64,128 --warps 4,8 --stages 2,3 --waves 2,4 --out $W/decode_options_hd128.json > $W/dko128.log 2>&1; note "dko128 rc=$?"
  MNEMOSYNE_TEST_DEVICE=cuda timeout 100 python -m pytest -q -p no:cacheprovider tests/test_kernel_decode.py tests/test_cuda_graphs.py tests/test_mixed_graph.py > $W/gpu_tests.log 2>&1; note "gpu tests rc=$?"
) &
A=$!
(export CUDA_VISIBLE_DEVICES=1
  timeout 200 python -m benchmarks.decode_synthetic_kv --contexts 1000000,2000000,3500000 --steps 32 --out $W/decode_1b.json > $W/dec1b.log 2>&1; note "decode 1b rc=$?"
  timeout 80 python -m benchmarks.decode_synthetic_kv --shape llama3-8b --contexts 131072 --steps 32 --out $W/decode_8b_128k.json > $W/dec8b.log 2>&1; note "decode 8b rc=$?"
) &
B=$!
wait $A $B
note ALLDONE
