"""Helpers for the memory tests: run both forms, compare states."""

from __future__ import annotations

import torch

from ham_rl import MemoryState


def random_starts(B: int, T: int, p: float = 0.15, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[B, T]`` bool episode starts at random places (some envs get none)."""
    return torch.rand(B, T, generator=generator) < p


def run_steps(mem, x: torch.Tensor, state: MemoryState, starts: torch.Tensor) -> tuple[torch.Tensor, MemoryState]:
    """The step form applied T times, without grad and in place as in rollouts; ``state`` is left as it was."""
    state = state.clone()
    ys = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            y, state = mem.step(x[:, t], state, starts[:, t], inplace=True)
            ys.append(y)
    return torch.stack(ys, 1), state


def assert_states_close(a: MemoryState, b: MemoryState, atol: float = 1e-5) -> None:
    """Same recurrent tensors, episode lengths, cache lengths and valid cache entries."""
    assert len(a.rnn) == len(b.rnn)
    for ta, tb in zip(a.rnn, b.rnn, strict=False):
        torch.testing.assert_close(ta, tb, atol=atol, rtol=0)
    assert torch.equal(a.episode_len, b.episode_len)
    assert torch.equal(a.cache_len, b.cache_len)
    if a.cache is None:
        assert b.cache is None
        return
    for env, n in enumerate(a.cache_len.tolist()):
        for name in ("keys", "values", "scores"):
            torch.testing.assert_close(
                getattr(a.cache, name)[env, :n], getattr(b.cache, name)[env, :n], atol=atol, rtol=0, msg=f"{name}[{env}]"
            )
        assert torch.equal(a.cache.times[env, :n], b.cache.times[env, :n])
