"""Evaluation: per-task metrics and the eval runner."""
