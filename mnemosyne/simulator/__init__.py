"""The real scheduler in virtual time (`mnemosyne simulate`) and the layout planner (`mnemosyne plan`).

trace.py     trace lines {"arrival_s", "prompt_len", "output_len"}
setup.py     EngineConfig and latency model for a model directory and a GPU (no device, no weights)
engine.py    SimulatedEngine: the engine's Scheduler, KVCacheManager and policies, driven like
             LLMEngine.step, with step times from the latency model on a virtual clock
pipeline.py  stage-level events of the sequence pipeline
report.py    per-request metrics, summary, plot
planner.py   enumerate tp x spp x kvp layouts; memory, TTFT and TBT of each; the best one
command.py   the two subcommands' arguments and entry points
"""
