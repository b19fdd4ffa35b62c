# Session 20, call A (nvidia-h200): the 8B mixed scenario with 32- and 16-token granules (one engine),
# the latency validation with the profile's own (pipelined) timing, whole-model chunk steps at 16-token
# steps of c after 240K keys.
W=/tmp/s20a; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
timeout 230 python -m benchmarks.mixed_long_short --shape llama3-8b --long-len 262144 --configs adaptive_lars_g16,adaptive_lars --profile $P8B --out $W/mixed_long_short_8b_g16_g32.json --step-log $W/mixed_8b_g16_g32_steps.jsonl --plot > $W/mixed8b.log 2>&1; note "mixed rc=$?"
timeout 170 python -m benchmarks.latency_validation --shape llama3-8b --profile $P8B --num-steps 80 --repeats 2 --out $W/latency_validation_8b.json --plot > $W/latency_validation_8b.log 2>&1; note "validation rc=$?"
timeout 110 python -m benchmarks.chunk_sweep --parts 8b --prefixes 245760 --chunks 32,48,64,80,96 --auto-path-only --part-timeout 100 --out $W/chunk_sweep_8b_240k.json --log $W/chunk_sweep_8b_240k.jsonl > $W/cs8b.log 2>&1; note "cs rc=$?"
cd $W && gzip -f *.jsonl 2>/dev/null; rm -rf repo
note ALLDONE
