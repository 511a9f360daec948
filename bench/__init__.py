"""Benchmarks of the data path, run as ``python -m bench.<name>``; see docs/performance.md."""
