# Session 21, call D (nvidia-h200): KV-parallel degree 1 on this code: one request at 1M, 2M and 3.5M
# tokens of the 1B shape (synthetic KV), alone and with 16 short requests, beside the kvp2 7M of call C.
W=/tmp/s21d; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
timeout 250 python3 -m benchmarks.decode_synthetic_kv --contexts 1e6,2e6,3.5e6 --num-short 16 --out $W/decode_synthetic_kv_1b_kvp1.json > $W/kvp1.log 2>&1; note "kvp1 rc=$?"
cd $W && rm -rf repo
note ALLDONE
