# Session 16, call A (nvidia-h200): the arrival-launch probe with replay timelines; nsys if present.
source .dev_lead/prelude.sh
P=/tmp/s16a; mkdir -p $P; echo start > $P/progress
P1B=benchmarks/results/serving_trace_session8_h200_2026-11-29/before/latency_profile_quick_1b.json
NSYS=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys 2>/dev/null | head -1)
echo "nsys=$NSYS" >> $P/progress; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv >> $P/progress
(timeout 200 nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu --format=csv -lms 20 > $P/smi_clocks.csv 2>&1 &)
timeout 240 python -m benchmarks.probes.arrival_launch_hold --out $P/alh_timeline_1b.json --latency-profile $P1B --sizes 1206,1372,2384,992,1206 --replay-timeline > $P/alh.log 2>&1; echo "timeline rc=$?" >> $P/progress
if [ -n "$NSYS" ]; then
  timeout 300 $NSYS profile --trace=cuda,nvtx,osrt --sample=none --cpuctxsw=none --capture-range=cudaProfilerApi --capture-range-end=stop --cuda-graph-trace=graph -o $P/alh_nsys python -m benchmarks.probes.arrival_launch_hold --out $P/alh_nsys_1b.json --latency-profile $P1B --sizes 1206,1372,992 --replay-timeline > $P/nsys.log 2>&1; echo "nsys rc=$?" >> $P/progress
  timeout 120 $NSYS stats --report cuda_api_trace,osrt_sum,cuda_api_sum --format csv --output $P/alh_nsys $P/alh_nsys.nsys-rep >> $P/nsys.log 2>&1; echo "stats rc=$?" >> $P/progress
  ls -la $P >> $P/progress
fi
rm -f $P/*.sqlite; gzip -f $P/*.jsonl $P/*.csv 2>/dev/null
cd /tmp && tar czf /tmp/s16a.tgz s16a; echo ALLDONE >> $P/progress
