"""Noisy-label demo (issue 6)."""
