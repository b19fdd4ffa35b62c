# Session 21, call A (nvidia-h200-x2): the 8B latency profile at tp2; one 512K prompt's TTFT with tp2 and
# spp2 (the layout `mnemosyne plan` recommends for 2 GPUs against the one measured in session 6); the
# kvp2 float32 exactness of a 64K prompt spanning both groups.
W=/tmp/s21a; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > $W/nvidia_smi.csv 2>&1
python3 -c "
from pathlib import Path
from mnemosyne.bench.long_context.run import write_model_dir, LONG_MAX_POSITIONS
write_model_dir('llama3-8b', Path('$W/m8b'))" ; note "model dir rc=$?"
timeout 170 python3 -m mnemosyne.cli profile --model $W/m8b/llama3-8b --load-format dummy --grid quick --tp 2 --out $W/latency_profile_quick_8b_tp2.json --no-cache > $W/prof8b_tp2.log 2>&1; note "prof tp2 rc=$?"
timeout 330 python3 -m benchmarks.spp_ttft --context 524288 --chunk 4096 --layouts tp2,spp2 --layout-timeout-s 160 --out $W/spp_ttft_8b_512k_tp2_spp2.json > $W/spp_ttft.log 2>&1; note "spp_ttft rc=$?"
left=$(( 540 - ($(date +%s)-T0) ))
if [ $left -gt 40 ]; then
  timeout $left python3 -m benchmarks.parallel_exactness --dtype float32 --layouts kvp2 --prompt-lens 65536 --no-hf --out $W/parallel_exactness_kvp2_64k_fp32.json > $W/exact.log 2>&1; note "exact rc=$?"
fi
cd $W && rm -rf repo m8b
note ALLDONE
