# Session 20, call C (nvidia-h200): the latency model against held-out random steps, 8B again
# with another seed, and the 1B shape with the profile its serving traces run with.
W=/tmp/s20c; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
timeout 200 python -m benchmarks.latency_validation --shape llama3.2-1b --profile $P1B --num-steps 80 --repeats 2 --out $W/latency_validation_1b.json --plot > $W/latency_validation_1b.log 2>&1; note "1b rc=$?"
timeout 170 python -m benchmarks.latency_validation --shape llama3-8b --profile $P8B --num-steps 80 --repeats 2 --seed 1 --out $W/latency_validation_8b_seed1.json --plot > $W/latency_validation_8b_seed1.log 2>&1; note "8b seed1 rc=$?"
cd $W && rm -rf repo
note ALLDONE
