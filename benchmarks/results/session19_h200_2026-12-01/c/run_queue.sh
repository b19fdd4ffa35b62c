# Session 19, call C (nvidia-h200): ws vs TMA per layer on ascending and shuffled blocks, contiguous vs strided splits;
# then the ws GPU tests with strided splits forced on (correctness of the new item order).
W=/tmp/s19c; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
timeout 150 python -m benchmarks.chunk_ws_programs --layouts ascending,shuffled --strided 0,1 --waves 1 --max-splits 0 --chunks 16,32,64,128 --prefixes 131072,524288 --out $W/chunk_ws_programs_8b.json > $W/ws_programs.log 2>&1; note "8b rc=$?"
sed -i 's/    strided_splits: bool = False,/    strided_splits: bool = True,/' mnemosyne/kernels/chunk_ws_attention.py
timeout 90 python -m pytest -m gpu -q -x tests/test_kernel_chunk_ws.py > $W/gpu_tests_strided.log 2>&1; note "tests strided rc=$?"
cd $W && rm -rf repo
note ALLDONE
