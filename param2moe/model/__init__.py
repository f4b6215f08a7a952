from .network import Param2MoEForCausalLM
from .shard import Shard

__all__ = ["Param2MoEForCausalLM", "Shard"]
