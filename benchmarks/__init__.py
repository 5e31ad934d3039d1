"""Benchmarks (`splitclip bench ...`), their load drivers, CPU accounting and report writers (not product code)."""
