"""The memory family: HAM and its baselines, all on one interface (see ``base.Memory``)."""

from ham_rl.memory.base import Memory, forward_group
from ham_rl.memory.baselines import GRUMemory, LSTMMemory, MLPMemory
from ham_rl.memory.hybrid import ROUTERS, HybridMemory
from ham_rl.memory.registry import MEMORIES, make_memory, memory_options
from ham_rl.memory.state import KVCache, MemoryState

__all__ = [
    "Memory",
    "forward_group",
    "HybridMemory",
    "GRUMemory",
    "LSTMMemory",
    "MLPMemory",
    "MEMORIES",
    "ROUTERS",
    "make_memory",
    "memory_options",
    "KVCache",
    "MemoryState",
]
