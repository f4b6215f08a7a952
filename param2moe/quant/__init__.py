"""Quantized weights: one format for every device (see `formats.py`), the torch oracles beside it."""

from .formats import METHODS, QuantizedWeight, dequantize, quantize

__all__ = ["METHODS", "QuantizedWeight", "dequantize", "quantize"]
