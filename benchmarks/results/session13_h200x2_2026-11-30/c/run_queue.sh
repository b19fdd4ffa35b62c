# The --no-activation-warm-up flag and worker/activation_warm_up.py belonged to an experiment that was dropped after
# this run (first and second eager steps of a size took the same time; no allocator retries): the committed probe
# has no flag, and first_eager_steps.json is the engine as committed.
# Session 13, call C (nvidia-h200): eager prefill steps the first and the second time a size runs, without and with the start-up activation warm-up; GPU tests of engines that start with it.
W=/tmp/s13c; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
T0=$(date +%s)
note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
timeout 150 python -m benchmarks.probes.first_eager_steps --no-activation-warm-up --out $W/first_eager_steps_before.json > $W/before.log 2>&1; note "before rc=$?"
timeout 150 python -m benchmarks.probes.first_eager_steps --out $W/first_eager_steps_after.json > $W/after.log 2>&1; note "after rc=$?"
MNEMOSYNE_TEST_DEVICE=cuda timeout 150 python -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_mixed_graph.py tests/test_activation_warm_up.py > $W/gpu_tests.log 2>&1; note "gpu tests rc=$?"
note ALLDONE
cd $W && tar czf /tmp/s13c.tgz --exclude=repo .
