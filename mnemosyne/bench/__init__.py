"""Benchmarks: `mnemosyne bench serve` (load against a running OpenAI-compatible server),
`mnemosyne bench latency` (one request's TTFT and TBT, any model) and
`mnemosyne bench long-context` (one GPU, against hardware floors and HF)."""
