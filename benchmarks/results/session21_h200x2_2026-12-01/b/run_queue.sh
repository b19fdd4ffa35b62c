# Session 21, call B (nvidia-h200-x2): why spp2 took 95.3 s in call A (72.5 s in session 6): the 512K
# prompt on spp2 with 2 and 4 micro-batches in flight, with the engine's step log (host time between a
# result and the next submission, path, cuDNN chunks) and every step's gap; the per-stage chunk times on
# one GPU (8-layer slice) against session 6's; SM clocks every second.
W=/tmp/s21b; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu --format=csv -lms 1000 > $W/nvidia_smi_clocks.csv 2>&1 &
SMI=$!
timeout 300 python3 -m benchmarks.spp_ttft --context 524288 --chunk 4096 --layouts spp2,spp2@4 --layout-timeout-s 145 --step-log-dir $W/steplogs --out $W/spp_ttft_8b_512k_spp2_depth.json > $W/spp_ttft.log 2>&1; note "spp_ttft rc=$?"
timeout 150 python3 -m benchmarks.spp_stage_times --contexts 524288 --chunks 4096 --out $W/spp_stage_times_8b_512k.json > $W/stage_times.log 2>&1; note "stage times rc=$?"
kill $SMI
cd $W && gzip -f steplogs/*.jsonl nvidia_smi_clocks.csv 2>/dev/null; rm -rf repo
note ALLDONE
