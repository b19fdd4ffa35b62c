# Session 19, call B (nvidia-h200): one layer's chunk attention, TMA vs warp-specialized at
# 1-8 waves of programs and two split caps (benchmarks/chunk_ws_programs.py).
W=/tmp/s19b; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
timeout 200 python -m benchmarks.chunk_ws_programs --out $W/chunk_ws_programs_8b.json > $W/ws_programs.log 2>&1; note "8b rc=$?"
cd $W && rm -rf repo
note ALLDONE
