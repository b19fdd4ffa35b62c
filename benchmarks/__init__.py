"""Benchmarks and evidence scripts: `python -m benchmarks.<name>`."""
