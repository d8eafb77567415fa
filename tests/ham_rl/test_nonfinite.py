"""A NaN or inf input to one env stays inside that env's episode, for every memory, in the step and sequence forms.

After the env's next reset its outputs are finite and those of a run that never saw the bad input; the other envs of
the batch are bitwise unaffected, and so are the env's outputs before the bad step (the chunked delta rule mixes a
chunk's steps through matmuls, so this is not free). Inside its episode the NaN is not hidden: the bad step's output
is NaN, and both forms agree on which outputs are.
"""

from __future__ import annotations

import pytest
import torch
from memory_helpers import assert_states_close, run_steps

from ham_rl import MEMORIES, make_memory

B, T, IN, D = 3, 40, 6, 16
ENV = 0  # the env that sees the bad input

#: every memory, plus HAM with a full cache that evicts and a window shorter than the bad episode
CASES = {name: (name, {}) for name in MEMORIES} | {
    "ham-capacity": ("ham", {"capacity": 3, "threshold": 0.0}),
    "window-evicting": ("window", {"window": 4}),
    "ham-conv-time": ("ham", {"conv_size": 4, "time_feature": True}),  # the former defaults: conv history, clock
}
#: (bad step, reset step of env ENV, where the sequence form splits the run into two calls, None: one call)
SPANS = {
    "one-segment": (10, 25, None),  # the bad step and the reset inside one segment (and one delta-rule chunk)
    "across-segments": (10, 25, 18),  # the bad state, cache and conv history carried into the next segment
    "at-the-boundary": (17, 18, 18),  # the bad step ends a segment, the next one starts with the reset
}
BAD = [pytest.param(float("nan"), id="nan"), pytest.param(float("inf"), id="inf")]


def build(case: str):
    torch.manual_seed(0)
    name, options = CASES[case]
    return make_memory(name, IN, D, **options)


def _inputs(mem, t_reset: int):
    """A warm state (caches hold entries), inputs and starts in which env ENV restarts only at ``t_reset``."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        _, warm = mem(torch.randn(B, 8, IN, generator=gen), mem.initial_state(B), torch.zeros(B, 8, dtype=torch.bool))
    x = torch.randn(B, T, IN, generator=gen)
    starts = torch.rand(B, T, generator=gen) < 0.08
    starts[ENV] = False
    starts[ENV, t_reset] = True
    return warm, x, starts


def _run(mem, x, state, starts, form: str, split: int | None):
    with torch.no_grad():
        if form == "step":
            return run_steps(mem, x, state, starts)
        if split is None:
            return mem(x, state, starts)
        y1, state = mem(x[:, :split], state, starts[:, :split])
        y2, state = mem(x[:, split:], state, starts[:, split:])
        return torch.cat([y1, y2], 1), state


FORM_SPANS = [("step", "one-segment"), ("step", "at-the-boundary")] + [("sequence", span) for span in SPANS]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("form, span", FORM_SPANS)
@pytest.mark.parametrize("value", BAD)
def test_bad_input_is_forgotten_at_the_reset(case, form, span, value):
    mem = build(case)
    t_bad, t_reset, split = SPANS[span]
    warm, x, starts = _inputs(mem, t_reset)
    x_bad = x.clone()
    x_bad[ENV, t_bad] = value
    y, state = _run(mem, x, warm, starts, form, split)
    y_bad, state_bad = _run(mem, x_bad, warm, starts, form, split)
    others = torch.arange(B) != ENV
    assert torch.equal(y_bad[others], y[others]), "another env's outputs changed"
    assert_states_close(state_bad[others], state[others], atol=0)
    assert torch.equal(y_bad[ENV, :t_bad], y[ENV, :t_bad]), "outputs before the bad step changed"
    assert torch.isnan(y_bad[ENV, t_bad]).any(), "the bad step's output hides the bad input"
    assert torch.isfinite(y_bad[ENV, t_reset:]).all(), "non-finite outputs after the reset"
    torch.testing.assert_close(y_bad[ENV, t_reset:], y[ENV, t_reset:], atol=1e-5, rtol=0)
    assert all(torch.isfinite(t[ENV]).all() for t in state_bad.rnn), "non-finite recurrent state after the reset"
    assert_states_close(state_bad[ENV], state[ENV], atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("value", BAD)
def test_both_forms_agree_on_what_is_nan(case, value):
    # The sequence form computes the chunked delta rule and the attention on sanitised inputs and writes NaN where
    # the step form's values depend on the bad input: exactly the same outputs.
    mem = build(case)
    warm, x, starts = _inputs(mem, 25)
    x[ENV, 10] = value
    y_seq, _ = _run(mem, x, warm, starts, "sequence", None)
    y_step, _ = _run(mem, x, warm, starts, "step", None)
    assert torch.equal(torch.isnan(y_seq), torch.isnan(y_step))
    finite = torch.isfinite(y_step)
    torch.testing.assert_close(y_seq[finite], y_step[finite], atol=1e-5, rtol=0)
