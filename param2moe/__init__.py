"""param2moe: an inference engine and OpenAI-compatible server for Param2MoE models."""

from .engine import CompletionOutput, RequestOutput, SamplingParams
from .llm import LLM

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "__version__"]
