"""The engine's adapters: those registered (by id, read once from their folders), and which of them
sit in the max_loras slots. A sequence holds its adapter's slot from admission until it finishes or
is preempted; a slot nobody holds may be given to another adapter (empty slots first, then the least
recently used), so one step mixes at most max_loras adapters, and the base model.
"""

from __future__ import annotations

import itertools

from .adapter import LoRAAdapter, LoRAError, load_adapter
from .request import LoRARequest
from .slots import LoRASlots


class LoRAManager:
    def __init__(self, slots: LoRASlots, model_config, device):
        self.slots, self.model_config, self.device = slots, model_config, device
        self.adapters: dict[int, LoRAAdapter] = {}
        self.slot_adapter: list[int | None] = [None] * slots.max_loras  # adapter id in each slot
        self.slot_users = [0] * slots.max_loras  # sequences holding each slot
        self.slot_used = [0] * slots.max_loras  # when each slot was last taken (LRU)
        self._tick = itertools.count(1)
        self._loads = itertools.count(1)

    # ------------------------------------------------------------------ registry
    def add(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter of this request, read from its folder the first time its id is seen."""
        known = self.adapters.get(request.lora_int_id)
        if known is not None:
            if (known.name, known.path) != (request.lora_name, request.lora_path) and request.lora_path:
                raise LoRAError(f"lora_int_id {request.lora_int_id} is already adapter {known.name!r} "
                                f"({known.path}); remove it first or use another id")
            return known
        other = next((a for a in self.adapters.values() if a.name == request.lora_name), None)
        if other is not None:
            raise LoRAError(f"lora_name {request.lora_name!r} is already adapter id {other.lora_id}")
        if not request.lora_path:
            raise LoRAError(f"adapter {request.lora_name!r} (id {request.lora_int_id}) is not loaded and "
                            "the request gives no lora_path")
        adapter = load_adapter(request.lora_path, self.model_config, self.slots.max_rank, request.lora_name,
                               request.lora_int_id)
        routed = adapter.routed_expert_modules
        if routed and not self.slots.routed_experts:
            raise LoRAError(f"adapter {adapter.name!r} targets routed experts ({routed[0]}, ...): start the engine "
                            "with lora_routed_experts on (--lora-routed-experts), which reserves their slots")
        adapter.to(self.device)
        adapter.cache_salt = ("lora", adapter.lora_id, next(self._loads))  # prefix-cache blocks of its own
        self.adapters[adapter.lora_id] = adapter
        return adapter

    def remove(self, lora_id: int) -> bool:
        """Forget an adapter no sequence holds; False if it is not registered."""
        if lora_id not in self.adapters:
            return False
        if lora_id in self.slot_adapter:
            slot = self.slot_adapter.index(lora_id)
            if self.slot_users[slot]:
                raise LoRAError(f"adapter {self.adapters[lora_id].name!r} is in use by {self.slot_users[slot]} "
                                "running sequence(s)")
            self.slot_adapter[slot] = None
        del self.adapters[lora_id]
        return True

    def by_name(self, name: str) -> LoRAAdapter | None:
        return next((a for a in self.adapters.values() if a.name == name), None)

    # ------------------------------------------------------------------ slots
    def acquire(self, seq) -> bool:
        """Give the sequence its adapter's slot (loading the adapter into a free one); False if every
        slot is held by sequences of other adapters. Sequences of the base model always succeed."""
        adapter = seq.request.lora
        if adapter is None:
            return True
        if adapter.lora_id in self.slot_adapter:
            slot = self.slot_adapter.index(adapter.lora_id)
        else:
            free = [s for s in range(len(self.slot_users)) if self.slot_users[s] == 0]
            if not free:
                return False
            slot = min(free, key=lambda s: (self.slot_adapter[s] is not None, self.slot_used[s]))
            self.slots.load(slot, adapter)
            self.slot_adapter[slot] = adapter.lora_id
        self.slot_users[slot] += 1
        self.slot_used[slot] = next(self._tick)
        seq.lora_slot = slot
        return True

    def release(self, seq) -> None:
        if seq.lora_slot >= 0:
            self.slot_users[seq.lora_slot] -= 1
            seq.lora_slot = -1
