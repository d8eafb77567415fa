"""Per-env memory state: recurrent tensors plus each env's own ragged KV cache.

Every memory of the family returns and consumes a :class:`MemoryState`. Tensors are batch-first, so
``state[idx]`` selects envs, ``MemoryState.cat`` joins them, and rollout code can store the state of every
env at the start of a rollout and replay any subset of envs from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

__all__ = ["KVCache", "MemoryState"]


def _pad_to(t: Tensor, length: int, dim: int = 1, value: float = 0.0) -> Tensor:
    """Pad ``t`` along ``dim`` with ``value`` up to ``length`` entries."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = length
    # One allocation, the old entries copied in and only the new slots filled: a concatenation allocated and filled
    # the padding first and then copied both, 3-4x the time when a rollout's caches grow.
    out = t.new_empty(shape)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    out.narrow(dim, t.shape[dim], missing).fill_(value)
    return out


@dataclass
class KVCache:
    """A ragged KV cache: env b holds ``length[b]`` valid entries in slots ``[0, length[b])``.

    Slots past an env's length hold garbage and are never read. The slot dimension ``L`` (the allocation)
    grows as needed and may differ between two caches; it is not a property of any env.

    :param keys: ``[B, L, H, K]`` cached keys (L2-normalised, as the attention reads them)
    :param values: ``[B, L, H, V]`` cached values
    :param scores: ``[B, L]`` router score of each entry when written (eviction drops the lowest)
    :param times: ``[B, L]`` long, step within the episode at which the entry was written (ties: oldest goes)
    :param length: ``[B]`` long, number of valid entries per env
    """

    keys: Tensor
    values: Tensor
    scores: Tensor
    times: Tensor
    length: Tensor

    @classmethod
    def empty(
        cls,
        batch_size: int,
        num_heads: int,
        key_dim: int,
        value_dim: int,
        slots: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """An empty cache with ``slots`` pre-allocated entries per env."""
        return cls(
            keys=torch.zeros(batch_size, slots, num_heads, key_dim, device=device, dtype=dtype),
            values=torch.zeros(batch_size, slots, num_heads, value_dim, device=device, dtype=dtype),
            scores=torch.zeros(batch_size, slots, device=device, dtype=torch.float32),
            times=torch.zeros(batch_size, slots, device=device, dtype=torch.long),
            length=torch.zeros(batch_size, device=device, dtype=torch.long),
        )

    @property
    def slots(self) -> int:
        """Allocated entries per env (>= max length)."""
        return self.keys.shape[1]

    def reserve(self, slots: int) -> KVCache:
        """Return a cache with at least ``slots`` allocated entries per env, doubling to amortise growth."""
        if slots <= self.slots:
            return self
        new = max(slots, 2 * self.slots, 8)
        return KVCache(
            keys=_pad_to(self.keys, new),
            values=_pad_to(self.values, new),
            scores=_pad_to(self.scores, new),
            times=_pad_to(self.times, new),
            length=self.length,
        )

    def clone(self) -> KVCache:
        """A copy that shares no storage with this cache."""
        return self._map(lambda t: t.clone())

    def compact(self) -> KVCache:
        """Drop allocated slots that no env uses (keeps at least one slot)."""
        used = max(int(self.length.max()) if self.length.numel() else 0, 1)
        if used >= self.slots:
            return self
        return KVCache(self.keys[:, :used], self.values[:, :used], self.scores[:, :used], self.times[:, :used], self.length)

    def valid_mask(self) -> Tensor:
        """``[B, L]`` bool, True at the slots that hold an entry."""
        return torch.arange(self.slots, device=self.length.device) < self.length[:, None]

    def _map(self, fn) -> KVCache:
        return KVCache(*(fn(getattr(self, f.name)) for f in fields(self)))

    def __getitem__(self, idx) -> KVCache:
        return self._map(lambda t: t[idx])

    @staticmethod
    def cat(caches: Sequence[KVCache]) -> KVCache:
        """Join caches along the env dimension, padding their allocations to the largest."""
        slots = max(c.slots for c in caches)
        return KVCache(
            keys=torch.cat([_pad_to(c.keys, slots) for c in caches]),
            values=torch.cat([_pad_to(c.values, slots) for c in caches]),
            scores=torch.cat([_pad_to(c.scores, slots) for c in caches]),
            times=torch.cat([_pad_to(c.times, slots) for c in caches]),
            length=torch.cat([c.length for c in caches]),
        )


@dataclass
class MemoryState:
    """What a memory carries between calls, for a batch of envs.

    :param rnn: recurrent tensors, each ``[B, ...]`` (HAM/GDN: ``S [B, H, K, V]``; GRU: ``h [B, D]``;
        LSTM: ``h, c``; mlp: none)
    :param cache: the per-env KV cache of attention memories, ``None`` for memories without one
    :param episode_len: ``[B]`` long, steps seen in each env's current episode
    """

    rnn: tuple[Tensor, ...]
    cache: KVCache | None
    episode_len: Tensor

    @property
    def batch_size(self) -> int:
        """Number of envs."""
        return self.episode_len.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    @property
    def cache_len(self) -> Tensor:
        """``[B]`` long, entries in each env's cache now (zeros for memories without a cache)."""
        if self.cache is None:
            return torch.zeros_like(self.episode_len)
        return self.cache.length

    @property
    def device(self) -> torch.device:
        """Device of the state's tensors."""
        return self.episode_len.device

    def _map(self, fn) -> MemoryState:
        return replace(
            self,
            rnn=tuple(fn(t) for t in self.rnn),
            cache=None if self.cache is None else self.cache._map(fn),
            episode_len=fn(self.episode_len),
        )

    def __getitem__(self, idx) -> MemoryState:
        """Select envs: ``state[3]``, ``state[2:5]``, ``state[tensor_of_indices]`` or a bool mask."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return self._map(lambda t: t[idx])

    def detach(self) -> MemoryState:
        """The same state, cut from the autograd graph (truncated BPTT)."""
        return self._map(lambda t: t.detach())

    def to(self, device: torch.device | str) -> MemoryState:
        """The same state on another device."""
        return self._map(lambda t: t.to(device))

    def clone(self) -> MemoryState:
        """A copy that shares no storage with this state."""
        return self._map(lambda t: t.clone())

    def compact(self) -> MemoryState:
        """Drop unused cache slots (e.g. before storing the state of a rollout)."""
        return self if self.cache is None else replace(self, cache=self.cache.compact())

    @staticmethod
    def cat(states: Sequence[MemoryState]) -> MemoryState:
        """Join states of the same memory along the env dimension."""
        if not states:
            raise ValueError("MemoryState.cat needs at least one state, got an empty sequence")
        first = states[0]
        if any((s.cache is None) != (first.cache is None) or len(s.rnn) != len(first.rnn) for s in states):
            raise ValueError("MemoryState.cat: the states come from different kinds of memory")
        return replace(
            first,
            rnn=tuple(torch.cat([s.rnn[i] for s in states]) for i in range(len(first.rnn))),
            cache=None if first.cache is None else KVCache.cat([s.cache for s in states]),
            episode_len=torch.cat([s.episode_len for s in states]),
        )

    def state_dict(self) -> dict:
        """Plain tensors for ``torch.save``."""
        out = {"rnn": list(self.rnn), "episode_len": self.episode_len}
        if self.cache is not None:
            out["cache"] = {f.name: getattr(self.cache, f.name) for f in fields(self.cache)}
        return out

    @classmethod
    def from_state_dict(cls, data: dict) -> MemoryState:
        """Inverse of :meth:`state_dict`."""
        cache = KVCache(**data["cache"]) if "cache" in data else None
        return cls(rnn=tuple(data["rnn"]), cache=cache, episode_len=data["episode_len"])
