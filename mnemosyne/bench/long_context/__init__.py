"""`mnemosyne bench long-context`: TTFT, TBT and attention kernels against their hardware
floors and Hugging Face transformers, on one GPU (run.py drives the parts)."""
