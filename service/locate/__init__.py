"""Locating knowledge in the served model: causal tracing (service/locate/trace.py)."""
