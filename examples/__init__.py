"""Runnable examples of converge (``python -m examples.triage`` from a checkout)."""
