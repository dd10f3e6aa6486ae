"""Benchmarks: speed, scaling and full-scale compile checks (print Markdown tables, write JSON)."""
