"""ham_rl: Hybrid Associative Memory (HAM) as the memory of reinforcement-learning agents.

>>> import ham_rl
>>> mem = ham_rl.make_memory("ham", input_size=8, hidden_size=32)
>>> state = mem.initial_state(batch_size=4)
"""

from ham_rl.memory import (
    MEMORIES,
    GRUMemory,
    HybridMemory,
    LSTMMemory,
    Memory,
    MLPMemory,
    forward_group,
    make_memory,
    memory_options,
)
from ham_rl.state import KVCache, MemoryState

__all__ = [
    "MEMORIES",
    "GRUMemory",
    "HybridMemory",
    "KVCache",
    "LSTMMemory",
    "MLPMemory",
    "Memory",
    "MemoryState",
    "forward_group",
    "make_memory",
    "memory_options",
]
__version__ = "0.1.0"
