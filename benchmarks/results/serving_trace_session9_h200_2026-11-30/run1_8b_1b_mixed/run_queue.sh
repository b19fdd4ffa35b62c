# Session 9, first run: results under /tmp/s9.
# Profiles: .dev_lead/s8_profile_1b.json = serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json;
# .dev_lead/s9_profile_8b.json = run1_8b_1b_mixed/latency_profile_quick_8b.json (measured in run 1).
W=/tmp/s9; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
T0=$(date +%s)
note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
Q=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu
( nvidia-smi --query-gpu=$Q,clocks_event_reasons.active --format=csv -l 1 > $W/smi.csv 2>&1 || nvidia-smi --query-gpu=$Q --format=csv -l 1 > $W/smi.csv 2>&1 ) &
python - <<'PY'
from pathlib import Path
from mnemosyne.bench.long_context.run import write_model_dir
for s, d in (("llama3.2-1b", "m1b"), ("llama3-8b", "m8b")):
    write_model_dir(s, Path("/tmp/s9") / d)
PY
note "model dirs rc=$?"
gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 300 python -m mnemosyne.cli profile --model $W/m8b/llama3-8b --load-format dummy --grid quick --out $W/latency_profile_quick_8b.json > $W/prof8b.log 2>&1; note "prof8b rc=$?"
  P=.dev_lead/s8_profile_8b.json; [ -f $W/latency_profile_quick_8b.json ] && P=$W/latency_profile_quick_8b.json
  timeout 720 python -m benchmarks.serving_trace --shape 8b --rate 0.12 --duration-s 300 --latency-profile $P --step-logs --configs lars_adaptive --out $W/st8b > $W/st8b_lars_adaptive.log 2>&1; note "st8b lars_adaptive rc=$?"
  timeout 400 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars --profile $P --out $W/mixed_long_short_8b.json --plot > $W/mixed.log 2>&1; note "mixed rc=$?"
}
gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 700 python -m benchmarks.serving_trace --shape 1b --rate 0.3 --duration-s 300 --latency-profile .dev_lead/s8_profile_1b.json --step-logs --configs lars_adaptive --out $W/st1b > $W/st1b_lars_adaptive.log 2>&1; note "st1b lars_adaptive rc=$?"
  MNEMOSYNE_TEST_DEVICE=cuda timeout 420 python -m pytest -q -p no:cacheprovider tests/test_exactness.py tests/test_mixed_graph.py tests/test_cuda_graphs.py tests/test_no_recompile.py tests/test_kernel_backend.py > $W/gpu_tests_defaults.log 2>&1; note "gpu tests rc=$?"
}
gpu0 & gpu1 & wait
note ALLDONE
pkill -x nvidia-smi
