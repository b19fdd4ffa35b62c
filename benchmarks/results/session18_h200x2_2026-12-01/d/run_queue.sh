# Session 18, call D (nvidia-h200): the Gluon chunk-prefix probe, warp-specialized variants
W=/tmp/s18d; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
V=serial_w8_s3,ws_s4,ws_p2_s2,ws2t_s4,ws2t_s3
timeout 150 python -m benchmarks.probes.gluon_chunk_prefix --check-only --variants $V > $W/check.log 2>&1; note "check rc=$?"
if grep -q '"ok": false' $W/check.log || ! grep -q '"variant": "ws2t_s3"' $W/check.log; then note "check failed: no sweep"; else
timeout 300 python -m benchmarks.probes.gluon_chunk_prefix --variants $V --out $W/gluon_chunk_prefix.json > $W/gluon.log 2>&1; note "sweep rc=$?"; fi
rm -rf $W/repo
note ALLDONE
