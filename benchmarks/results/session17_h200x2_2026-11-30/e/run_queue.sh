# Session 17, call E (nvidia-h200-x2): 256-row query tiles (two warpgroups sharing each K/V tile) against
# the engine's defaults, one layer's chunk attention; 8B heads on GPU 0, 1B heads on GPU 1.
source .dev_lead/prelude.sh
W=/tmp/s17e; mkdir -p $W; echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
(export CUDA_VISIBLE_DEVICES=0
  timeout 230 python -m benchmarks.chunk_kernel_variants --wide-tiles --chunks 32 64 128 256 --prefixes 131072 524288 --budget-s 200 --out $W/wide_tiles_8b.json > $W/ckv8b.log 2>&1; note "8b rc=$?"
) &
A=$!
(export CUDA_VISIBLE_DEVICES=1
  timeout 230 python -m benchmarks.chunk_kernel_variants --shape llama3.2-1b --wide-tiles --chunks 32 64 128 256 --prefixes 131072 1048576 --budget-s 200 --out $W/wide_tiles_1b.json > $W/ckv1b.log 2>&1; note "1b rc=$?"
) &
B=$!
wait $A $B
note ALLDONE
