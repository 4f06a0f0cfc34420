"""Benchmarks and the demo: ``python -m bench.demo`` (strategy table), ``python -m bench.microbench`` (per-op)."""
