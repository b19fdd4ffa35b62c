# Session 21, call F (the sixth call) (nvidia-h200): does the caching allocator free device memory (cudaFree: a device
# sync) while eager 4096-token chunks run after long prefixes? One 256K prompt of the 8B shape on
# one GPU (spp_ttft's engine, in process), then the allocator's counters.
W=/tmp/s21g; mkdir -p $W; rm -rf $W/repo; cp -r "$PWD" $W/repo; cd $W/repo
source .dev_lead/prelude.sh
export PYTHONPATH=$W/repo:/tmp/site
echo start > $W/progress
T0=$(date +%s); note() { echo "$(( $(date +%s)-T0 )) s: $*" >> $W/progress; }
timeout 140 python3 - > $W/alloc.log 2>&1 <<'P'
import json, tempfile, torch
from pathlib import Path
from benchmarks.spp_ttft import parse_args, run_layout
from mnemosyne.bench.long_context.run import LONG_MAX_POSITIONS, write_model_dir
ns = parse_args(["--context", "262144", "--chunk", "4096", "--step-log-dir", "/tmp/s21g/steplogs"])
model_dir = write_model_dir("llama3-8b", Path(tempfile.mkdtemp()), LONG_MAX_POSITIONS)
row = run_layout(ns, model_dir, "spp1")
row.pop("step_gaps_s")
s = torch.cuda.memory_stats()
keys = ["num_alloc_retries", "num_device_alloc", "num_device_free", "num_ooms", "num_sync_all_streams"]
print(json.dumps({"row": row, "allocator": {k: s.get(k) for k in keys},
                  "reserved_peak_gib": s.get("reserved_bytes.all.peak", 0) / 2**30,
                  "allocated_peak_gib": s.get("allocated_bytes.all.peak", 0) / 2**30}))
P
note "alloc rc=$?"
cd $W && gzip -f steplogs/*.jsonl 2>/dev/null; rm -rf repo
note ALLDONE
