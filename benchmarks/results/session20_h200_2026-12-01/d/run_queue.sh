# Session 20, call D (nvidia-h200): the GPU tests on this session's code: the exactness suite
# against HF (float32, CUDA path) and, beside it, the kernel / graph tests.
W=/tmp/s20d; mkdir -p $W; rm -rf $W/repo $W/repo2; cp -r "$PWD" $W/repo; cp -r "$PWD" $W/repo2; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
( cd $W/repo2 && export PYTHONPATH=$W/repo2:/tmp/site && echo "# MNEMOSYNE_TEST_DEVICE=cuda pytest -q tests/test_kernel_decode.py tests/test_cuda_graphs.py tests/test_mixed_graph.py tests/test_no_recompile.py tests/test_kvp_merge.py tests/test_kernel_backend.py tests/test_kernel_chunk_tma.py (run_queue.sh), 1x NVIDIA H200, $(date -u +%F), 895c20d" > $W/gpu_tests_kernels.log; MNEMOSYNE_TEST_DEVICE=cuda timeout 400 python -m pytest -q -p no:cacheprovider tests/test_kernel_decode.py tests/test_cuda_graphs.py tests/test_mixed_graph.py tests/test_no_recompile.py tests/test_kvp_merge.py tests/test_kernel_backend.py tests/test_kernel_chunk_tma.py >> $W/gpu_tests_kernels.log 2>&1; note "kernels rc=$?" ) &
echo "# MNEMOSYNE_TEST_DEVICE=cuda pytest -q tests/test_exactness.py --durations=15 (run_queue.sh), 1x NVIDIA H200, $(date -u +%F), 895c20d" > $W/gpu_tests_exactness.log
MNEMOSYNE_TEST_DEVICE=cuda timeout 530 python -m pytest -q -p no:cacheprovider --durations=15 tests/test_exactness.py >> $W/gpu_tests_exactness.log 2>&1; note "exactness rc=$?"
wait
cd $W && rm -rf repo repo2
note ALLDONE
