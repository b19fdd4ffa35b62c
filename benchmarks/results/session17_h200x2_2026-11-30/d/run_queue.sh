# Session 17, call D (nvidia-h200-x2): whole-model chunk steps on the current code (the path the engine
# takes: eager, piecewise and mixed-step graphs), 8B on GPU 0 and 1B on GPU 1.
source .dev_lead/prelude.sh
W=/tmp/s17d; mkdir -p $W; echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
(export CUDA_VISIBLE_DEVICES=0
  timeout 450 python -m benchmarks.chunk_sweep --parts 8b --prefixes 131072,524288,900000 --chunks 16,32,64,128,256 --auto-path-only --part-timeout 430 --out $W/chunk_sweep_8b.json --log $W/chunk_sweep_8b.jsonl > $W/cs8b.log 2>&1; note "8b rc=$?"
) &
A=$!
(export CUDA_VISIBLE_DEVICES=1
  timeout 450 python -m benchmarks.chunk_sweep --parts 1b --prefixes 131072,1048576,3000000 --chunks 16,32,64,128,256 --auto-path-only --part-timeout 430 --out $W/chunk_sweep_1b.json --log $W/chunk_sweep_1b.jsonl > $W/cs1b.log 2>&1; note "1b rc=$?"
) &
B=$!
wait $A $B
note ALLDONE
