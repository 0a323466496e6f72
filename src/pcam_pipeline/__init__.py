"""pcam-pipeline: a reproducible, DVC-versioned deep-learning pipeline for PatchCamelyon."""

__version__ = "0.1.0"
