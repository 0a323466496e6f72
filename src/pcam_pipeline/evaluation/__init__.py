"""Judging a model on held-out patches: classification metrics, thresholds and calibration."""
