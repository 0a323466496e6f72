"""Drift detection: image features of patches (numpy only, so `pcam serve` imports them), the
reference profile written with the model, and the two-sample tests against it (docs/drift.md)."""
