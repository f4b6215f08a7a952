"""Structured outputs: constrained decoding with xgrammar (JSON schema, regex, choice, grammar, tool calls).

`StructuredOutputsParams` (params.py) goes in `SamplingParams.structured_outputs`. The engine's side is
`StructuredOutputs` (manager.py); grammars compile in compiler.py against the vocabulary of vocab.py;
formats.py builds the structural tags for tool calls and for reasoning before a constrained answer.
xgrammar is imported on first use only (the `structured` extra).
"""

from .params import StructuredOutputError, StructuredOutputsParams

__all__ = ["StructuredOutputError", "StructuredOutputsParams"]
