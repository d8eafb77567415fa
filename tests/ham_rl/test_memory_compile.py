"""``Memory.compile_step``: ham's rollout step through ``torch.compile`` computes what the eager step computes."""

from __future__ import annotations

import pytest
import torch
from memory_helpers import random_starts

from ham_rl import make_memory

B, T, IN, D = 4, 24, 6, 16


@pytest.mark.parametrize("options", [{}, {"attn_sink": 1.0}], ids=["default", "sink"])
def test_compiled_step_matches_the_eager_step_as_the_cache_grows_and_tau_moves(options):
    torch.manual_seed(0)
    eager = make_memory("ham", IN, D, num_heads=2, threshold=0.5, **options)
    compiled = make_memory("ham", IN, D, num_heads=2, threshold=0.5, **options)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_step()
    torch._dynamo.utils.counters.clear()
    x, starts = torch.randn(T, B, IN), random_starts(B, T).T
    states = [m.initial_state(B) for m in (eager, compiled)]
    routed = 0
    with torch.no_grad():
        for t in range(T):
            if t == T // 2:  # the feedback rule moves tau between updates: a new value, not a new graph
                for m in (eager, compiled):
                    m.set_threshold(0.3)
            # fresh tensors, as a rollout's are (a view's storage offset would be one more thing to guard on)
            x_t, start = x[t].clone(), starts[t].clone()
            (y_e, s_e), (y_c, s_c) = (
                m.step(x_t, s, start, inplace=True) for m, s in zip((eager, compiled), states, strict=True)
            )
            torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
            assert torch.equal(compiled.last_routing[1], eager.last_routing[1]), f"step {t}: routing differs"
            assert torch.equal(s_c.cache.length, s_e.cache.length)
            routed += int(eager.last_routing[1].sum())
            states = [s_e, s_c]
    held = torch.arange(s_e.cache.keys.shape[1]) < s_e.cache.length[:, None]
    torch.testing.assert_close(s_c.cache.keys[:, : held.shape[1]][held], s_e.cache.keys[held])
    torch.testing.assert_close(s_c.rnn[0], s_e.rnn[0], rtol=1e-5, atol=1e-5)
    assert 0 < routed < B * T  # the case caches some steps and not others
    # graphs for the first cache sizes (0/1 are specialised), then one dynamic graph for every later size and tau
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4
