"""Helpers of ``benchmarks/run.py``: timing, step runners, sections and the report."""
