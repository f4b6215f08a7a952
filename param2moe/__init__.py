"""param2moe: an inference engine and OpenAI-compatible server for Param2MoE models."""

from .engine import CompletionOutput, RequestOutput, SamplingParams
from .hf_compat import install as _install_hf_compat
from .llm import LLM
from .lora.request import LoRARequest

_install_hf_compat()

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "LoRARequest", "RequestOutput", "SamplingParams", "__version__"]
