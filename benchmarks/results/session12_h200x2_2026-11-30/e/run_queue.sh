W=/tmp/s12e; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
python -m benchmarks.probes.chunk_launch_kernels --head-dim 128 --cases "32*1:1099,32*1:1799,32*1:2419,1*1:131071,8*1:32767" --out $W/decode_tail_hd128.jsonl > $W/dd128.log 2>&1; echo "hd128 rc=$?"
python -m benchmarks.probes.chunk_launch_kernels --head-dim 64 --cases "32*1:1099,32*1:2419" --out $W/decode_tail_hd64.jsonl > $W/dd64.log 2>&1; echo "hd64 rc=$?"
MNEMOSYNE_TEST_DEVICE=cuda timeout 120 python -m pytest -q -p no:cacheprovider tests/test_kernel_decode.py tests/test_cuda_graphs.py tests/test_mixed_graph.py > $W/gpu_tests.log 2>&1; echo "tests rc=$?"; tail -2 $W/gpu_tests.log
cd $W && tar czf $OUT/s12e.tgz --exclude=repo .
