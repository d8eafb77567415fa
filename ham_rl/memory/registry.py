"""Memory names -> constructors: ``make_memory("ham", input_size, hidden_size, **options)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from ham_rl.memory.base import Memory
from ham_rl.memory.baselines import GRUMemory, LSTMMemory, MLPMemory
from ham_rl.memory.hybrid import HybridMemory

__all__ = ["MEMORIES", "make_memory", "memory_options"]


def _check_window(window: object) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise ValueError(f"`window` must be a positive int, got {window!r}")
    return window


def window_memory(
    input_size: int,
    hidden_size: int,
    window: int = 32,
    num_heads: int = 4,
    conv_size: int = 4,
    time_feature: bool | str = False,
    conv_path: str = "local",
) -> Memory:
    """Attention over the last ``window`` steps of the episode (every token cached, the oldest evicted)."""
    return HybridMemory(input_size, hidden_size, num_heads=num_heads, use_rnn=False, router="all",
                        capacity=_check_window(window), conv_size=conv_size, time_feature=time_feature,
                        conv_path=conv_path)  # fmt: skip


def hqlt_memory(
    input_size: int,
    hidden_size: int,
    window: int = 32,
    num_heads: int = 4,
    fixed_decay: bool = False,
    conv_size: int = 4,
    time_feature: bool | str = False,
    conv_path: str = "local",
) -> Memory:
    """Gated delta-rule RNN plus window attention with the same gates: the naive hybrid of Irie et al. 2025."""
    return HybridMemory(input_size, hidden_size, num_heads=num_heads, router="all", capacity=_check_window(window),
                        fixed_decay=fixed_decay, conv_size=conv_size, time_feature=time_feature,
                        conv_path=conv_path)  # fmt: skip


def _hybrid(defaults: dict | None = None, **fixed) -> Callable[..., Memory]:
    """HybridMemory with some options fixed by the memory's name (they are not options of that name) and some
    defaults of its own."""
    defaults = defaults or {}
    params = inspect.signature(HybridMemory).parameters
    allowed = [n for n in params if n not in fixed]

    def build(input_size: int, hidden_size: int, **options) -> Memory:
        return HybridMemory(input_size, hidden_size, **fixed, **{**defaults, **options})

    signature = [params[n].replace(default=defaults[n]) if n in defaults else params[n] for n in allowed]
    build.__signature__ = inspect.Signature(signature)
    return build


#: ham's router: the RMS prediction error, its threshold kept where 5% of the rollout's steps are cached (docs/ham.md)
HAM_ROUTING = dict(score="error", threshold=0.15, target_fraction=0.05)


#: every memory of the family; see docs/memories.md
MEMORIES: dict[str, Callable[..., Memory]] = {
    "ham": _hybrid(HAM_ROUTING, router="surprise", use_rnn=True, use_attention=True),
    "ham-learned": _hybrid(router="learned", use_rnn=True, use_attention=True),
    "gdn": _hybrid(
        use_rnn=True,
        use_attention=False,
        router="surprise",
        threshold=float("inf"),
        target_fraction=None,
        threshold_lr=0.1,
        capacity=0,
    ),  # fmt: skip
    "attention": _hybrid(
        use_rnn=False,
        use_attention=True,
        router="all",
        threshold=float("-inf"),
        target_fraction=None,
        threshold_lr=0.1,
        capacity=0,
        fixed_decay=False,
    ),  # fmt: skip
    "window": window_memory,
    "hqlt": hqlt_memory,
    "gru": GRUMemory,
    "lstm": LSTMMemory,
    "mlp": MLPMemory,
}


def memory_options(name: str) -> list[str]:
    """The options ``make_memory(name, ...)`` accepts besides input_size and hidden_size."""
    params = inspect.signature(MEMORIES[name]).parameters
    return [p for p in params if p not in ("self", "input_size", "hidden_size", "options")]


def make_memory(name: str, input_size: int, hidden_size: int, **options) -> Memory:
    """Build the memory called ``name`` (one of ``MEMORIES``) with the shared interface."""
    if name not in MEMORIES:
        raise ValueError(f"unknown memory {name!r}; allowed: {', '.join(MEMORIES)}")
    allowed = memory_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for memory {name!r}; allowed: {', '.join(allowed)}"
        )
    return MEMORIES[name](input_size, hidden_size, **options)
