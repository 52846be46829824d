"""Benchmarks, one module each: python -m minisink.bench.<name>."""
