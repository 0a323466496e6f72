"""Tooling for reviewing results beside the pipeline (no stage imports it)."""
