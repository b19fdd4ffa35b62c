# Session 20, call E (nvidia-h200): whole-model chunk steps through the engine's executor,
# timed serially and pipelined (two in flight, as async scheduling runs them), both shapes.
W=/tmp/s20e; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
timeout 200 python -m benchmarks.chunk_steps_pipelined --shape llama3-8b --out $W/chunk_steps_pipelined_8b.json > $W/csp8b.log 2>&1; note "8b rc=$?"
timeout 170 python -m benchmarks.chunk_steps_pipelined --shape llama3.2-1b --out $W/chunk_steps_pipelined_1b.json > $W/csp1b.log 2>&1; note "1b rc=$?"
cd $W && rm -rf repo
note ALLDONE
