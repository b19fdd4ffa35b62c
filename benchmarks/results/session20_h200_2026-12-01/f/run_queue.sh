# Session 20, call F (nvidia-h200): 256 tokens after 3M keys (1B) through the graph sweep and
# through the engine's executor on one lease (e/ had 265 ms against the seventeenth session's 237).
W=/tmp/s20f; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
timeout 100 python -m benchmarks.chunk_sweep --parts 1b --prefixes 3000000 --chunks 128,256 --auto-path-only --part-timeout 90 --out $W/chunk_sweep_1b_3m.json --log $W/chunk_sweep_1b_3m.jsonl > $W/cs1b.log 2>&1; note "sweep rc=$?"
timeout 100 python -m benchmarks.chunk_steps_pipelined --shape llama3.2-1b --prefixes 3000000 --chunks 128,256 --out $W/chunk_steps_pipelined_1b_3m.json > $W/csp1b.log 2>&1; note "pipelined rc=$?"
cd $W && rm -rf repo
note ALLDONE
