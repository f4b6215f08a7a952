"""Multi-LoRA serving: PEFT adapter folders (adapter.py), their slots in the network (slots.py), and the
engine's registry of adapters and slots (manager.py). The batched delta itself is a kernel
(param2moe/kernels/lora.py, triton/lora.py)."""

from .adapter import LoRAAdapter, LoRAError, load_adapter, lora_targets
from .request import LoRARequest

__all__ = ["LoRAAdapter", "LoRAError", "LoRARequest", "load_adapter", "lora_targets"]
