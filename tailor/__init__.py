"""Tailor: fit a pre-trained LLM to one business — its task, its jargon, its voice."""

__version__ = "0.1.0"
