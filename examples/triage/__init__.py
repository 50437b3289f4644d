"""The triage example: GitHub issues answered by an LLM agent, through converge's edge.

Run ``python -m examples.triage`` from a checkout (see :mod:`examples.triage.app`).
"""
