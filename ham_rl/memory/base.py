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

from ham_rl.memory.state import KVCache, MemoryState

__all__ = ["Memory", "TIME_FEATURES", "TimeEmbedding", "episode_steps", "forward_group"]

#: where the step-in-episode clock enters: nowhere, the input (True or "input"), or the readout only
TIME_FEATURES = (False, True, "input", "readout")


def episode_steps(episode_len: Tensor, starts: Tensor) -> Tensor:
    """Step of each token within its episode: ``episode_len [B]``, ``starts [B, T]`` -> ``[B, T]`` long."""
    idx = torch.arange(starts.shape[1], device=starts.device)  # [T], broadcast over the rows: fewer ops, every minibatch
    last_start = torch.where(starts, idx, -1).cummax(1).values
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


#: what each cache tensor must be, for the state check's message
_CACHE_LAYOUT = {
    "keys": "[B, slots, num_heads, head_dim]",
    "values": "[B, slots, num_heads, head_dim]",
    "scores": "[B, slots]",
    "times": "long [B, slots]",
    "length": "long [B]",
}


class Memory(nn.Module):
    """Base class: input checks, episode-step bookkeeping and the time feature.

    :param input_size: features per step of the input ``x``
    :param hidden_size: features per step of the output ``y``
    :param time_feature: add a sinusoidal embedding of the step within the episode to the input
    """

    #: True for memories that keep a KV cache (their state has ``cache``)
    has_cache: bool = False

    def __init__(self, input_size: int, hidden_size: int, time_feature: bool | str = False):
        super().__init__()
        self.input_size = _check_positive_int("input_size", input_size)
        self.hidden_size = _check_positive_int("hidden_size", hidden_size)
        if time_feature not in TIME_FEATURES:
            allowed = ", ".join(repr(t) for t in TIME_FEATURES)
            raise ValueError(f"`time_feature` must be one of {allowed}, got {time_feature!r}")
        # True / "input": the clock joins the input (every key, value, query and score carries it); "readout": it joins
        # the output only, so the heads get elapsed time and the memory's contents stay free of it
        at_input = time_feature is True or time_feature == "input"
        self.time_embedding = TimeEmbedding(input_size) if at_input else None
        self.time_readout = TimeEmbedding(hidden_size) if time_feature == "readout" else None
        #: ``(score [B], routed [B] bool)`` of the last ``step()`` call, for memories that route tokens to a cache
        #: (None otherwise): what evaluation and the trainer's cache pictures read to see which steps were cached
        self.last_routing: tuple[Tensor, Tensor] | None = None

    # -- what subclasses implement -------------------------------------------------------------------------
    def _initial_rnn(self, batch_size: int, device: torch.device | str | None) -> tuple[Tensor, ...]:
        return ()

    def _initial_cache(self, batch_size: int, device: torch.device | str | None):
        return None

    def _sequence(self, x: Tensor, state: MemoryState, starts: Tensor, steps: Tensor) -> tuple[Tensor, MemoryState]:
        raise NotImplementedError

    def _step(
        self, x: Tensor, state: MemoryState, start: Tensor, steps: Tensor, checked: bool = False
    ) -> tuple[Tensor, MemoryState]:
        raise NotImplementedError

    def _rnn_spec(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """``(name [layout], shape after the batch dim)`` of each tensor ``state.rnn`` holds, for the state check."""
        return ()

    def _cache_dims(self) -> tuple[int, int, int] | None:
        """``(heads, key dim, value dim)`` of the KV cache entries, or None for a memory without a cache."""
        return None

    def _describe(self) -> str:
        """The memory and the options its state's shapes follow from, for error messages."""
        return f"{type(self).__name__}(hidden_size={self.hidden_size})"

    def compile_step(self) -> None:
        """Run the step form's tensor work through ``torch.compile`` (rollouts: many small ops per step, fused).

        Outputs equal the eager step's within float32 round-off; the first steps compile (tens of seconds on CPU).
        Memories whose step is one library call (gru, lstm, mlp) keep it as it is: there is nothing to fuse.
        """

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
        return self._add_clock(y, steps), new_state

    def _add_clock(self, y: Tensor, steps: Tensor) -> Tensor:
        """``y`` with the readout clock added (``time_feature="readout"``)."""
        return y if self.time_readout is None else y + self.time_readout(steps).to(y.dtype)

    def _prepare(self, x: Tensor, state: MemoryState, starts: Tensor) -> tuple[Tensor, Tensor]:
        """Check a sequence call's inputs; returns ``x`` with the time feature added (if on) and ``steps [B, T]``."""
        self._check(x, state, starts, sequence=True)
        steps = episode_steps(state.episode_len, starts)
        if self.time_embedding is not None:
            x = x + self.time_embedding(steps).to(x.dtype)
        return x, steps

    def step(
        self, x: Tensor, state: MemoryState, start: Tensor, inplace: bool = False, checked: bool = False
    ) -> tuple[Tensor, MemoryState]:
        """Step form: ``x [B, input_size]``, ``start [B]`` bool -> ``(y [B, hidden_size], state)``.

        ``state`` is left as it was. With ``inplace=True``, memories with a KV cache write the new entry straight
        into the cache tensors of ``state``, which then must not be used again (an eviction or a reset overwrites
        entries it holds): the rollout loops' choice, where copying a growing cache every step would cost more than
        the step itself, and the state is replaced by the returned one at once. ``checked=True`` skips the checks of
        the arguments' shapes and dtypes, for a loop that passes the state the previous step returned and inputs
        shaped as those of a checked step.
        """
        if not checked:
            self._check(x, state, start, sequence=False)
        if not inplace and state.cache is not None:
            state = replace(state, cache=state.cache.clone())
        steps = state.episode_len.masked_fill(start, 0)
        if self.time_embedding is not None:
            x = x + self.time_embedding(steps).to(x.dtype)
        y, new_state = self._step(x, state, start, steps, checked)
        new_state.episode_len = steps + 1
        return self._add_clock(y, steps), new_state

    def _groupable(self, memories: Sequence[Memory]) -> bool:
        """Whether ``_forward_group`` can run these memories together (``forward_group``)."""
        return False

    def _forward_group(
        self, memories: Sequence[Memory], x: Tensor, states: Sequence[MemoryState], starts: Tensor
    ) -> list[tuple[Tensor, MemoryState]]:
        raise NotImplementedError(f"{type(self).__name__} runs grouped memories one by one")

    def _check(self, x: Tensor, state: MemoryState, starts: Tensor, sequence: bool) -> None:
        # Runs every rollout step: shape and dtype comparisons only, never a reduction over a tensor.
        name, dims = ("starts", "[B, T]") if sequence else ("start", "[B]")
        x_dims = "[B, T, input_size]" if sequence else "[B, input_size]"
        if not isinstance(x, Tensor) or x.dim() != (3 if sequence else 2) or x.shape[-1] != self.input_size:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"`x` must have shape {x_dims} with input_size={self.input_size}, got {got}")
        dtype, spec, cache_dims = self._layout()
        if x.dtype != dtype and not (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
            raise ValueError(
                f"`x` must have the dtype of the memory's parameters, {dtype}, got {x.dtype}; pass `x.to({dtype})`"
            )
        if sequence and x.shape[1] == 0:
            raise ValueError(f"`x` must hold at least one step (T >= 1), got T=0 in shape {tuple(x.shape)}")
        if not isinstance(starts, Tensor) or starts.dtype != torch.bool:
            got = starts.dtype if isinstance(starts, Tensor) else type(starts).__name__
            raise ValueError(f"`{name}` must be a bool tensor of shape {dims}, got dtype {got}; pass `{name}.bool()`")
        if tuple(starts.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"`{name}` must have shape {dims} = {tuple(x.shape[:-1])} to match x, got {tuple(starts.shape)}")
        if not isinstance(state, MemoryState) or state.batch_size != x.shape[0]:
            got = state.batch_size if isinstance(state, MemoryState) else type(state).__name__
            raise ValueError(f"`state` must be a MemoryState for B={x.shape[0]} envs, got {got}")
        self._check_state(state, x, spec, cache_dims)

    def _layout(self) -> tuple[torch.dtype, tuple[tuple[str, tuple[int, ...]], ...], tuple[int, int, int] | None]:
        """``(parameters' dtype, _rnn_spec(), _cache_dims())``, cached: the step form checks against them every call."""
        key = self._layout_key()
        cached = self.__dict__.get("_cached_layout")
        if cached is None or cached[0] != key:
            cached = (key, (next(self.parameters()).dtype, self._rnn_spec(), self._cache_dims()))
            self.__dict__["_cached_layout"] = cached
        return cached[1]

    def _layout_key(self) -> tuple:
        """The attributes ``_rnn_spec`` reads that may change after construction (the dtype: see ``_apply``)."""
        return ()

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_cached_layout", None)  # .to(), .double(), .cuda() may change the parameters' dtype
        return super()._apply(fn, *args, **kwargs)

    def _check_state(self, state: MemoryState, x: Tensor, spec: tuple, cache_dims: tuple[int, int, int] | None) -> None:
        """``state`` holds the tensors this memory's configuration makes, in their shapes (another memory's does not)."""
        B, episode_len, rnn, cache = x.shape[0], state.episode_len, state.rnn, state.cache
        ok = episode_len.dtype == torch.long and episode_len.dim() == 1 and episode_len.device == x.device
        ok = ok and type(rnn) is tuple and len(rnn) == len(spec) and (cache is None) == (cache_dims is None)
        for (_, shape), t in zip(spec, rnn, strict=False) if ok else ():  # equal lengths when ok
            ok = ok and isinstance(t, Tensor) and t.is_floating_point() and t.shape == (B, *shape)
        if not ok:
            self._raise_state_error(state, x, spec, cache_dims)
        if cache is not None:
            self._check_cache(cache, B, cache_dims)

    def _raise_state_error(self, state: MemoryState, x: Tensor, spec: tuple, cache_dims: tuple[int, int, int] | None) -> None:
        """Say what ``_check_state`` found wrong, in one line."""
        B, episode_len, me = x.shape[0], state.episode_len, self._describe
        if episode_len.dtype != torch.long or episode_len.dim() != 1:
            got = f"{episode_len.dtype} {tuple(episode_len.shape)}"
            raise ValueError(f"`state.episode_len` must be a long tensor of shape [B], got {got}")
        if episode_len.device != x.device:
            where = str(x.device)
            raise ValueError(
                f"`state` must be on the device of `x`, {where}, got {episode_len.device}; pass `state.to({where!r})`"
            )
        if not isinstance(state.rnn, tuple) or len(state.rnn) != len(spec):
            want = ", ".join(n for n, _ in spec) or "none"
            got = len(state.rnn) if isinstance(state.rnn, tuple) else type(state.rnn).__name__
            raise ValueError(
                f"`state.rnn` must hold {len(spec)} tensor(s) ({want}) for {me()}, got {got}; another memory's state?"
            )
        for i, ((what, shape), t) in enumerate(zip(spec, state.rnn, strict=True)):
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.shape != (B, *shape):
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"`state.rnn[{i}]` ({what}) must be a float tensor of shape {(B, *shape)} for {me()}, got {got}"
                )
        if cache_dims is None:
            raise ValueError(f"`state.cache` must be None: {me()} keeps no KV cache, got a KVCache; another memory's state?")
        raise ValueError(f"`state.cache` must be a KVCache for {me()}, got None; another memory's state?")

    def _check_cache(self, cache: KVCache, B: int, dims: tuple[int, int, int]) -> None:
        """The cache's tensors have the shapes ``[B, slots, heads, key/value dim]``, ``[B, slots]`` and ``[B]``."""
        if not isinstance(cache, KVCache):
            raise ValueError(f"`state.cache` must be a KVCache for {self._describe()}, got {type(cache).__name__}")
        H, K, V = dims
        L = cache.keys.shape[1] if cache.keys.dim() == 4 else -1
        want = {"keys": (B, L, H, K), "values": (B, L, H, V), "scores": (B, L), "times": (B, L), "length": (B,)}
        for name, shape in want.items():
            t = getattr(cache, name)
            if L < 0 or t.shape != shape or (name in ("times", "length") and t.dtype != torch.long):
                shape_text = "(" + ", ".join("slots" if d < 0 else str(d) for d in shape) + ")"
                got = f"{t.dtype} {tuple(t.shape)}"
                raise ValueError(
                    f"`state.cache.{name}` must be {_CACHE_LAYOUT[name]} = {shape_text} for {self._describe()}, got {got}"
                )
