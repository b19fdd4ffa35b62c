# Session 22 (nvidia-h200, one H200): the commands behind a/-e/, in the order they ran. The prelude
# (.dev_lead/prelude.sh, see the results README) also installed cuda-bindings 13.0.3 (the driver's
# green-context API) from a carried wheel. The probe ran from the working tree of the commit that
# added it; c/single_thread/ ran the revision before `time_prompt` got its launching thread.
source .dev_lead/prelude.sh
export PYTHONPATH=$PWD:/tmp/site
# e/: the 1B 3M-key row of the pipelined chunk steps, on the mixed-step graphs
python -m benchmarks.chunk_steps_pipelined --shape llama3.2-1b --prefixes 3000000 --out e/chunk_steps_pipelined_1b_3m.json
# a/: one chunk step of 2048 tokens after 128K / 224K keys beside 32 decodes of 1536 keys, per SM split
python -m benchmarks.probes.two_lane_overlap --decode-sms 8,16,24,32 --out a/two_lane_overlap_8b.json
# b/: chunk sizes 1024-4096 after 32K / 224K keys; cuBLAS told of the split (carveout) or not
python -m benchmarks.probes.two_lane_overlap --prefixes 32768,229376 --chunks 1024,2048,4096 --decode-sms 16,24 \
    --carveout --no-priority-stream --out b/two_lane_overlap_8b_chunks.json
# c/single_thread/: a whole 256K-token prompt, chunk steps launched from the decode lane's thread
python -m benchmarks.probes.two_lane_overlap --prefixes "" --chunks 4096 --decode-sms 16,24 --whole-prompt 262144 \
    --no-priority-stream --out c/single_thread/two_lane_prompt_256k_c4096.json
python -m benchmarks.probes.two_lane_overlap --prefixes "" --chunks 2048 --decode-sms 16 --whole-prompt 262144 \
    --no-priority-stream --out c/single_thread/two_lane_prompt_256k_c2048.json
# c/: the same with the chunk steps launched from a thread of their own
python -m benchmarks.probes.two_lane_overlap --prefixes "" --chunks 4096 --decode-sms 16,24 --whole-prompt 262144 \
    --no-priority-stream --out c/two_lane_prompt_256k_c4096_threads.json
# d/: a heavier decode lane (64 decodes of 4096 keys) against 4096-token chunks after 224K keys
python -m benchmarks.probes.two_lane_overlap --prefixes 229376 --chunks 4096 --decode-sms 16,24,32,48 --decodes 64 \
    --decode-keys 4096 --no-priority-stream --out d/two_lane_overlap_8b_64x4k.json
# f/ (a later lease, the next session, on the probe's launcher-thread revision): the whole prompt again, every
# cuDNN graph bucket warmed on the one long-lived launching thread before the timed runs
python -m benchmarks.probes.two_lane_overlap --prefixes "" --chunks 4096 --decode-sms 16,24 --whole-prompt 262144 \
    --no-priority-stream --out f/two_lane_prompt_256k_c4096_warm.json
