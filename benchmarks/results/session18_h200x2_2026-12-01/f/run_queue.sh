# Session 18, call F (nvidia-h200): GPU tests of the warp-specialized chunk kernel + a timing probe
W=/tmp/s18f; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
timeout 240 python -m pytest -m gpu -x -q tests/test_kernel_chunk_ws.py > $W/gpu_tests.log 2>&1; note "tests rc=$?"
rm -rf $W/repo
note ALLDONE
