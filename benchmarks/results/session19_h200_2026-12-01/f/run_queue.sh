# Session 19, call F (nvidia-h200): the latency model (the 8B profile the serving traces run with) against
# held-out random step compositions on the current code; output straight under $OUT (the call may be cut).
source .dev_lead/prelude.sh
P8B=benchmarks/results/serving_trace_session9_h200_2026-11-30/run1_8b_1b_mixed/latency_profile_quick_8b.json
timeout 230 python -m benchmarks.latency_validation --shape llama3-8b --profile $P8B --num-steps 80 --repeats 2 --out $OUT/latency_validation_8b.json --plot > $OUT/latency_validation_8b.log 2>&1; echo "rc=$?" >> $OUT/latency_validation_8b.log
