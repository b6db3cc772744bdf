"""Measuring the indexes: ground truth, sweeps, baselines, tuning, metrics and timing."""
