"""Measurement: benchmarks, tree tuning, the paper comparison, data sets and task metrics."""
