"""Benchmark scripts: one per question a user asks; run them with ``python -m benchmarks.<name>``."""
