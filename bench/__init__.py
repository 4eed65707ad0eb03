"""Benchmarks: run as scripts (``python -m bench.throughput``), never as timed tests."""
