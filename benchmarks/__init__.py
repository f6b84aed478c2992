"""Benchmark suite (not installed; run from a source checkout). See runner.py."""
