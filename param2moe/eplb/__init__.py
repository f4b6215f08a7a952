"""Expert load balancing (EPLB) on expert parallelism: load statistics, redundant experts, rearrangement.

- `placement.py`: where each expert goes, from its load (DeepSeek's greedy / hierarchical packing);
- `maps.py`: the device tensors each MoE layer routes through (logical -> physical map, load counters);
- `transfer.py`: moving expert weights between ranks, in place;
- `balancer.py`: one rank's state and the rearrangement between steps; `ExpertLoad`, the statistics.

Settings: EngineConfig's enable_eplb, num_redundant_experts, eplb_window_size, eplb_step_interval.
"""

from .balancer import ExpertBalancer, ExpertLoad
from .placement import rebalance

__all__ = ["ExpertBalancer", "ExpertLoad", "rebalance"]
