"""The one memory interface every memory of the family shares (HAM and baselines alike).

A memory maps a stream of per-env inputs to per-env outputs while carrying a :class:`MemoryState`::

    state = mem.initial_state(batch_size)
    y, state = mem(x, state, starts)       # sequence form: x [B, T, I], starts bool [B, T] -> y [B, T, D]
    y, state = mem.step(x, state, start)   # step form:     x [B, I],    start bool [B]     -> y [B, D]

``starts[b, t]`` means env b begins a new episode at step t: nothing from before t may influence the output
at t or later. The two forms agree to round-off. The base class checks inputs, tracks each env's step within
its episode, and adds the optional time-in-episode feature; subclasses implement ``_sequence`` and ``_step``.

``forward_group(memories, x, states, starts)`` runs several memories over the same rows (an actor's and a critic's)
and returns what the separate calls would; memories that support it (``_groupable``) share their costly ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from ham_rl.memory.state import MemoryState

__all__ = ["Memory", "TimeEmbedding", "episode_steps", "forward_group"]


def episode_steps(episode_len: Tensor, starts: Tensor) -> Tensor:
    """Step of each token within its episode: ``episode_len [B]``, ``starts [B, T]`` -> ``[B, T]`` long."""
    T = starts.shape[1]
    idx = torch.arange(T, device=starts.device).expand_as(starts)
    last_start = torch.where(starts, idx, torch.full_like(idx, -1)).cummax(1).values
    return torch.where(last_start >= 0, idx - last_start, episode_len[:, None] + idx)


def forward_group(
    memories: Sequence[Memory], x: Tensor, states: Sequence[MemoryState], starts: Tensor
) -> list[tuple[Tensor, MemoryState]]:
    """``[m(x, s, starts) for m, s in zip(memories, states)]``, as one batched call where the memories allow it.

    A recurrent PPO runs its actor's and its critic's memory over the same rows. Memories that support it (HAM and
    its relatives whose delta rule and attention are configured alike, see ``HybridMemory``) run those two ops once,
    over ``G * B`` rows; outputs, states and gradients are those of the separate calls.
    """
    if len(memories) != len(states):
        raise ValueError(f"forward_group: got {len(memories)} memories but {len(states)} states")
    if len(memories) > 1 and memories[0]._groupable(memories):
        return memories[0]._forward_group(memories, x, states, starts)
    return [m(x, s, starts) for m, s in zip(memories, states, strict=True)]


class TimeEmbedding(nn.Module):
    """Sinusoidal features of the step within the episode, projected to the memory's input size."""

    def __init__(self, input_size: int, num_frequencies: int = 16, max_period: float = 4096.0):
        super().__init__()
        freqs = torch.exp(-math.log(max_period) * torch.arange(num_frequencies) / num_frequencies)
        self.register_buffer("freqs", freqs, persistent=False)
        self.proj = nn.Linear(2 * num_frequencies, input_size)

    def features(self, steps: Tensor) -> Tensor:
        """``steps [...]`` long -> the sin/cos features before the projection, ``[..., 2 * num_frequencies]``."""
        angles = steps.to(self.freqs.dtype)[..., None] * self.freqs
        return torch.cat([angles.sin(), angles.cos()], -1)

    def forward(self, steps: Tensor) -> Tensor:
        """``steps [...]`` long -> ``[..., input_size]``."""
        return self.proj(self.features(steps))


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return value


class Memory(nn.Module):
    """Base class: input checks, episode-step bookkeeping and the time feature.

    :param input_size: features per step of the input ``x``
    :param hidden_size: features per step of the output ``y``
    :param time_feature: add a sinusoidal embedding of the step within the episode to the input
    """

    #: True for memories that keep a KV cache (their state has ``cache``)
    has_cache: bool = False

    def __init__(self, input_size: int, hidden_size: int, time_feature: bool = False):
        super().__init__()
        self.input_size = _check_positive_int("input_size", input_size)
        self.hidden_size = _check_positive_int("hidden_size", hidden_size)
        self.time_embedding = TimeEmbedding(input_size) if time_feature else None

    # -- what subclasses implement -------------------------------------------------------------------------
    def _initial_rnn(self, batch_size: int, device: torch.device | str | None) -> tuple[Tensor, ...]:
        return ()

    def _initial_cache(self, batch_size: int, device: torch.device | str | None):
        return None

    def _sequence(self, x: Tensor, state: MemoryState, starts: Tensor, steps: Tensor) -> tuple[Tensor, MemoryState]:
        raise NotImplementedError

    def _step(self, x: Tensor, state: MemoryState, start: Tensor, steps: Tensor) -> tuple[Tensor, MemoryState]:
        raise NotImplementedError

    # -- threshold interface (memories with a router override) ---------------------------------------------
    @property
    def threshold(self) -> float | None:
        """The router threshold tau, or None for memories without a router."""
        return None

    def set_threshold(self, tau: float) -> None:
        """Set tau (deployment-time trade of return for memory); only memories with a router have one."""
        raise ValueError(f"{type(self).__name__} has no router, so it has no threshold to set (got {tau!r})")

    def end_update(self) -> dict[str, float | None]:
        """Call once after each PPO update: applies any threshold feedback and returns routing stats."""
        return {"kv_fraction": None, "threshold": None}

    # -- the public interface ------------------------------------------------------------------------------
    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> MemoryState:
        """The state of ``batch_size`` envs that have seen nothing."""
        _check_positive_int("batch_size", batch_size)
        if device is None:
            device = next((p.device for p in self.parameters()), torch.device("cpu"))
        return MemoryState(
            rnn=self._initial_rnn(batch_size, device),
            cache=self._initial_cache(batch_size, device),
            episode_len=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    def forward(self, x: Tensor, state: MemoryState, starts: Tensor) -> tuple[Tensor, MemoryState]:
        """Sequence form: ``x [B, T, input_size]``, ``starts [B, T]`` bool -> ``(y [B, T, hidden_size], state)``."""
        x, steps = self._prepare(x, state, starts)
        y, new_state = self._sequence(x, state, starts, steps)
        new_state.episode_len = steps[:, -1] + 1
        return y, new_state

    def _prepare(self, x: Tensor, state: MemoryState, starts: Tensor) -> tuple[Tensor, Tensor]:
        """Check a sequence call's inputs; returns ``x`` with the time feature added (if on) and ``steps [B, T]``."""
        self._check(x, state, starts, sequence=True)
        steps = episode_steps(state.episode_len, starts)
        if self.time_embedding is not None:
            x = x + self.time_embedding(steps).to(x.dtype)
        return x, steps

    def step(self, x: Tensor, state: MemoryState, start: Tensor, inplace: bool = False) -> tuple[Tensor, MemoryState]:
        """Step form: ``x [B, input_size]``, ``start [B]`` bool -> ``(y [B, hidden_size], state)``.

        ``state`` is left as it was. With ``inplace=True``, memories with a KV cache write the new entry straight
        into the cache tensors of ``state``, which then must not be used again (an eviction or a reset overwrites
        entries it holds): the rollout loops' choice, where copying a growing cache every step would cost more than
        the step itself, and the state is replaced by the returned one at once.
        """
        self._check(x, state, start, sequence=False)
        if not inplace and state.cache is not None:
            state = replace(state, cache=state.cache.clone())
        steps = torch.where(start, torch.zeros_like(state.episode_len), state.episode_len)
        if self.time_embedding is not None:
            x = x + self.time_embedding(steps).to(x.dtype)
        y, new_state = self._step(x, state, start, steps)
        new_state.episode_len = steps + 1
        return y, new_state

    def _groupable(self, memories: Sequence[Memory]) -> bool:
        """Whether ``_forward_group`` can run these memories together (``forward_group``)."""
        return False

    def _forward_group(
        self, memories: Sequence[Memory], x: Tensor, states: Sequence[MemoryState], starts: Tensor
    ) -> list[tuple[Tensor, MemoryState]]:
        raise NotImplementedError(f"{type(self).__name__} runs grouped memories one by one")

    def _check(self, x: Tensor, state: MemoryState, starts: Tensor, sequence: bool) -> None:
        name, dims = ("starts", "[B, T]") if sequence else ("start", "[B]")
        x_dims = "[B, T, input_size]" if sequence else "[B, input_size]"
        if not isinstance(x, Tensor) or x.dim() != (3 if sequence else 2) or x.shape[-1] != self.input_size:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"`x` must have shape {x_dims} with input_size={self.input_size}, got {got}")
        if not isinstance(starts, Tensor) or starts.dtype != torch.bool:
            got = starts.dtype if isinstance(starts, Tensor) else type(starts).__name__
            raise ValueError(f"`{name}` must be a bool tensor of shape {dims}, got dtype {got}; pass `{name}.bool()`")
        if tuple(starts.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"`{name}` must have shape {dims} = {tuple(x.shape[:-1])} to match x, got {tuple(starts.shape)}")
        if not isinstance(state, MemoryState) or state.batch_size != x.shape[0]:
            got = state.batch_size if isinstance(state, MemoryState) else type(state).__name__
            raise ValueError(f"`state` must be a MemoryState for B={x.shape[0]} envs, got {got}")
