"""ham_rl: Hybrid Associative Memory (HAM) as the memory of reinforcement-learning agents.

>>> import ham_rl
>>> mem = ham_rl.make_memory("ham", input_size=8, hidden_size=32)
>>> state = mem.initial_state(batch_size=4)

The package's layers import one way: ``ham_rl.kernels`` <- ``ham_rl.memory`` <- ``ham_rl.agents`` <- the
applications (``train``, ``evaluate``, ``report``, ``sb3``); ``ham_rl.envs`` imports none of them. The names below are
re-exported lazily, so ``import ham_rl.kernels`` does not pull in the memory layer above it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ham_rl.memory import (
        MEMORIES,
        GRUMemory,
        HybridMemory,
        KVCache,
        LSTMMemory,
        Memory,
        MemoryState,
        MLPMemory,
        forward_group,
        make_memory,
        memory_options,
    )

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


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("ham_rl.memory"), name)
    raise AttributeError(f"module 'ham_rl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
