# Session 18, call B (nvidia-h200): the Gluon chunk-prefix probe (check + sweep)
W=/tmp/s18b; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
(timeout 480 python -m benchmarks.probes.gluon_chunk_prefix --out $W/gluon_chunk_prefix.json > $W/gluon.log 2>&1; note "gluon rc=$?") &
A=$!
wait $A
rm -rf $W/repo
note ALLDONE
