# Session 21, call E (nvidia-h200): a quick latency profile of the 1B shape on today's kernels (the
# planner's KVP decode predictions beside the measured TBT at kvp 1 and 2).
W=/tmp/s21f; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
python3 -c "
from pathlib import Path
from mnemosyne.bench.long_context.run import write_model_dir, LONG_MAX_POSITIONS
write_model_dir('llama3.2-1b', Path('$W/m1b'), LONG_MAX_POSITIONS)"
timeout 150 python3 -m mnemosyne.cli profile --model $W/m1b/llama3.2-1b --load-format dummy --grid quick --out $W/latency_profile_quick_1b.json --no-cache > $W/prof1b.log 2>&1; note "prof1b rc=$?"
cd $W && rm -rf repo m1b
note ALLDONE
