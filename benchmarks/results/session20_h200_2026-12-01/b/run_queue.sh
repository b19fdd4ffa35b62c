# Session 20, call B (nvidia-h200): GPU time per kernel of the chunk steps that miss 1.3x most
# (1B after 128K keys, c = 16 / 32 / 64; 8B c = 64 after 128K), piecewise and mixed-step graphs.
W=/tmp/s20b; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
timeout 200 python -m benchmarks.probes.mixed_graph_kernels --shape llama3.2-1b --cases 16:131072,32:131072,64:131072,32:1048576 --out $W/k1b > $W/k1b.log 2>&1; note "1b rc=$?"
timeout 200 python -m benchmarks.probes.mixed_graph_kernels --shape llama3-8b --cases 64:131072,32:131072 --out $W/k8b > $W/k8b.log 2>&1; note "8b rc=$?"
cd $W && rm -rf repo
note ALLDONE
