from .config import EngineConfig
from .llm_engine import EngineError, LLMEngine
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import OutputKind, SamplingParams

__all__ = ["CompletionOutput", "EngineConfig", "EngineError", "LLMEngine", "Logprob", "OutputKind",
           "RequestOutput", "SamplingParams"]
