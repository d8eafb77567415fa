"""Torch recurrent baselines (GRU, LSTM) and the no-memory lower bound (MLP), on the shared interface."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ham_rl.kernels.nonfinite import zero_rows
from ham_rl.memory.base import Memory
from ham_rl.memory.state import MemoryState

__all__ = ["GRUMemory", "LSTMMemory", "MLPMemory"]


def _segments(starts: Tensor) -> list[tuple[int, int]]:
    """Split ``[0, T)`` at every step where any env starts an episode: ``[(t0, t1), ...]``."""
    T = starts.shape[1]
    cuts = [0] + [t for t in starts.any(0).nonzero().flatten().tolist() if t > 0] + [T]
    return list(zip(cuts[:-1], cuts[1:], strict=False))


def _reset(hidden: tuple[Tensor, ...], start: Tensor) -> tuple[Tensor, ...]:
    """Zero the hidden state of the envs that start an episode; selected, as NaN * 0 would keep a finished episode's NaN."""
    return tuple(zero_rows(h, start) for h in hidden)


class _TorchRNNMemory(Memory):
    """A torch ``nn.GRU``/``nn.LSTM`` run over the stretches between resets (fused kernels, no per-step loop)."""

    rnn_class: type[nn.RNNBase]

    def __init__(self, input_size: int, hidden_size: int, time_feature: bool | str = False):
        super().__init__(input_size, hidden_size, time_feature)
        self.rnn = self.rnn_class(input_size, hidden_size, batch_first=True)

    def _initial_rnn(self, batch_size, device):
        return tuple(torch.zeros(batch_size, self.hidden_size, device=device) for _ in self._rnn_spec())

    def _rnn_spec(self):
        names = ("h", "c") if isinstance(self.rnn, nn.LSTM) else ("h",)
        return tuple((f"{n} [B, hidden_size]", (self.hidden_size,)) for n in names)

    def _run(self, x: Tensor, hidden: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        packed = tuple(h[None] for h in hidden)  # torch wants [layers, B, D]
        y, out = self.rnn(x, packed if len(packed) == 2 else packed[0])
        out = out if isinstance(out, tuple) else (out,)
        return y, tuple(h[0] for h in out)

    def _sequence(self, x, state, starts, steps):
        hidden, ys = state.rnn, []
        # Every env shares the cut points, so one fused call covers all envs between two reset steps.
        for t0, t1 in _segments(starts):
            y, hidden = self._run(x[:, t0:t1], _reset(hidden, starts[:, t0]))
            ys.append(y)
        return torch.cat(ys, 1), MemoryState(rnn=hidden, cache=None, episode_len=state.episode_len)

    def _step(self, x, state, start, steps, checked=False):
        y, hidden = self._run(x[:, None], _reset(state.rnn, start))
        return y[:, 0], MemoryState(rnn=hidden, cache=None, episode_len=state.episode_len)


class GRUMemory(_TorchRNNMemory):
    """GRU baseline (torch ``nn.GRU``); state ``h [B, hidden_size]``."""

    rnn_class = nn.GRU


class LSTMMemory(_TorchRNNMemory):
    """LSTM baseline (torch ``nn.LSTM``); state ``h, c [B, hidden_size]``."""

    rnn_class = nn.LSTM


class MLPMemory(Memory):
    """No memory: a two-layer MLP of the current input, the lower bound every memory must beat."""

    def __init__(self, input_size: int, hidden_size: int, time_feature: bool | str = False):
        super().__init__(input_size, hidden_size, time_feature)
        self.net = nn.Sequential(nn.Linear(input_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, hidden_size))

    def _sequence(self, x, state, starts, steps):
        return self.net(x), MemoryState(rnn=(), cache=None, episode_len=state.episode_len)

    def _step(self, x, state, start, steps, checked=False):
        return self.net(x), MemoryState(rnn=(), cache=None, episode_len=state.episode_len)
