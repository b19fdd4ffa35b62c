# Session 21, call C (nvidia-h200-x2): the later pipeline stage now reports plan n before it launches
# plan n+1: the 512K prompt on spp2 (2 micro-batches in flight, the default) with step logs; spp1 as the
# baseline of the efficiency; then KV-parallel decode at 7M tokens over kvp2 (synthetic KV) on this code.
W=/tmp/s21c; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
timeout 330 python3 -m benchmarks.spp_ttft --context 524288 --chunk 4096 --layouts spp1,spp2 --layout-timeout-s 200 --step-log-dir $W/steplogs --out $W/spp_ttft_8b_512k_spp1_spp2.json > $W/spp_ttft.log 2>&1; note "spp_ttft rc=$?"
left=$(( 545 - ($(date +%s)-T0) ))
if [ $left -gt 90 ]; then
  timeout $left python3 -m benchmarks.decode_synthetic_kv --kvp 2 --contexts 7e6 --num-short 16 --out $W/decode_synthetic_kv_1b_kvp2_7m.json > $W/kvp2.log 2>&1; note "kvp2 rc=$?"
fi
cd $W && gzip -f steplogs/*.jsonl 2>/dev/null; rm -rf repo
note ALLDONE
