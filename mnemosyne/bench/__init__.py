"""Benchmarks against a running OpenAI-compatible server (`mnemosyne bench serve`)."""
