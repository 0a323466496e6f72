"""Tooling over DVC experiments (not pipeline stages): seeds, their statistics, and search."""
