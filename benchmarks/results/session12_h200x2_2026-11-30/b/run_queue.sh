# Session 12, call B (nvidia-h200-x2): split sweeps (chunk waves, decode budgets), slow launches, 8B mixed with the prompt made before the clock.
W=/tmp/s12b; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
T0=$(date +%s)
note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 200 python -m benchmarks.probes.chunk_launch_kernels --head-dim 128 --cases "224:40960,96:131072,64:196608,32:196608,512:8192" --waves 2,4,8,16 --out $W/split_sweep_chunks_hd128.jsonl > $W/sweep_chunks.log 2>&1; note "sweep chunks rc=$?"
  timeout 150 python -m benchmarks.probes.chunk_launch_kernels --head-dim 128 --cases "32*1:1099,32*1:1799,32*1:2419,1*1:131071,8*1:32767" --decode-budgets 1,4,8,16,33,66 --out $W/split_sweep_decodes_hd128.jsonl > $W/sweep_decodes.log 2>&1; note "sweep decodes rc=$?"
  timeout 100 python -m benchmarks.probes.chunk_launch_kernels --head-dim 64 --cases "32*1:1099,32*1:2419" --decode-budgets 1,8,16,66 --out $W/split_sweep_decodes_hd64.jsonl > $W/sweep_decodes64.log 2>&1; note "sweep decodes64 rc=$?"
}
gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 250 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars --profile $P8B --out $W/mixed_long_short_8b_prompt_first.json --step-log $W/mixed_8b_prompt_first_steps.jsonl > $W/mixed8b.log 2>&1; note "mixed 8b rc=$?"
  timeout 120 python -m benchmarks.probes.slow_launches --shape llama3-8b --long-len 32768 --out $W/probes > $W/slow_launches.log 2>&1; note "slow launches rc=$?"
}
gpu0 & G0=$!; gpu1 & G1=$!; wait $G0 $G1
note ALLDONE
cd $W && gzip -f *.jsonl 2>/dev/null; tar czf /tmp/s12b.tgz --exclude=repo .
