"""Gemma4 TP×PP fine-tuning runner on DeepSpeed's pipeline engine."""

__version__ = "0.1.0"
