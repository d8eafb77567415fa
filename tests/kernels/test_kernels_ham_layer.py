"""The HAM layer's native per-token calls (``kernels/ham_layer/cpu_layer.cpp``) against their PyTorch reference:
outputs and every input's gradient, with the edge cases the reference defines (a zero q row, the softplus past its
threshold, NaN kept), and the memory's sequence pass through them against its PyTorch ops; the sequence pass as one
autograd node (``cpu_sequence.py``) against the same pass op by op."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close

from ham_rl import make_memory
from ham_rl.kernels import native
from ham_rl.kernels.ham_layer import cpu_layer, cpu_sequence, reference
from ham_rl.memory.hybrid import HybridMemory

pytestmark = pytest.mark.skipif(not native.native_available(), reason="the native CPU kernels could not be built here")

N, H, G = 203, 4, 5


def _grads(outputs, inputs, weights):
    loss = sum((o * w).sum() for o, w in zip(outputs, weights, strict=True))
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("d", [16, 8])
def test_tokens_match_the_reference(d):
    torch.manual_seed(0)
    qkv = torch.randn(N, 3, H, d)
    qkv[1, 0, 2] = 0.0  # a zero q: the norm clamps at eps, and the backward has no radial term there
    z = torch.randn(N, G, H) * 8
    z[2, 0] = 25.0  # softplus is linear past 20, in value and gradient
    log_scale = torch.randn(H)
    inputs = [t.requires_grad_() for t in (qkv, z, log_scale)]
    got, ref = cpu_layer.cpu_tokens(*inputs), reference.tokens(*inputs)
    for name, r, o in zip(("qkvn", "gates", "q_attn"), ref, got, strict=True):
        assert_close(name, r, o, 1e-6)
    weights = [torch.randn_like(r) for r in ref]
    for name, r, o in zip(
        ("dqkv", "dz", "dlog_scale"), _grads(ref, inputs, weights), _grads(got, inputs, weights), strict=True
    ):
        assert_close(name, r, o, 1e-5)


def test_tokens_without_the_attention_gradient():
    # Outputs that reach no loss get no gradient (None in the backward): the call must treat them as zero.
    torch.manual_seed(1)
    inputs = [t.requires_grad_() for t in (torch.randn(N, 3, H, 16), torch.randn(N, G, H), torch.randn(H))]
    got, ref = cpu_layer.cpu_tokens(*inputs), reference.tokens(*inputs)
    w = torch.randn_like(ref[0])
    g_got = torch.autograd.grad((got[0] * w).sum(), inputs, allow_unused=True)
    g_ref = torch.autograd.grad((ref[0] * w).sum(), inputs, allow_unused=True)
    assert_close("dqkv", g_ref[0], g_got[0], 1e-5)
    assert float(g_got[1].abs().max()) == 0.0 and float(g_got[2].abs().max()) == 0.0


def test_tokens_keep_a_nan_in_its_own_row():
    qkv, z = torch.randn(N, 3, H, 16), torch.randn(N, G, H)
    qkv[5, 1, 0, 3] = float("nan")
    qkvn, gates, _ = cpu_layer.cpu_tokens(qkv, z, torch.zeros(H))
    assert torch.isnan(qkvn[5, 1, 0]).all(), "a NaN in k makes its head's unit k NaN, as F.normalize does"
    finite = torch.ones(N, 3, H, dtype=torch.bool)
    finite[5, 1, 0] = False
    assert torch.isfinite(qkvn[finite]).all() and torch.isfinite(gates).all()


@pytest.mark.parametrize("d", [16, 8])
def test_readout_matches_the_reference(d):
    torch.manual_seed(2)
    o_rnn, o_kv, local = (torch.randn(N, H, d) for _ in range(3))
    o_kv[3] = 0.0
    gates, weight = torch.rand(N, G, H), torch.randn(H * d)
    inputs = [t.requires_grad_() for t in (o_rnn, o_kv, local, gates, weight)]
    channels, eps = (2, 3, 4), torch.finfo(torch.float32).eps
    got = cpu_layer.cpu_readout(*inputs, channels, eps)
    ref = reference.readout(*inputs, channels, eps)
    assert_close("y", ref, got, 1e-5)
    w = torch.randn_like(ref)
    names = ("d_o_rnn", "d_o_kv", "d_local", "d_gates", "d_weight")
    got_grads = _grads([got], inputs, [w])
    for name, r, o in zip(names, _grads([ref], inputs, [w]), got_grads, strict=True):
        assert_close(name, r, o, 1e-5)
    assert float(got_grads[3][:, :2].abs().max()) == 0.0, "the gates not read out get no gradient"


@pytest.mark.parametrize("options", [{}, {"attn_sink": 1.0, "threshold": 0.1}, {"gate_bias": 2.0, "threshold": 0.0}])
def test_memory_sequence_pass_same_with_the_native_calls(monkeypatch, options):
    # ham's sequence pass (a PPO minibatch's forward and backward) runs the two calls; with them off it runs its own
    # PyTorch ops. Outputs, the final state and every parameter's gradient agree to round-off.
    torch.manual_seed(3)
    memory = make_memory("ham", 24, 64, **options)
    monkeypatch.setattr(HybridMemory, "_native_sequence_fits", lambda *a: False)  # op by op, not as one node
    x = torch.randn(4, 50, 24)
    starts = torch.rand(4, 50) < 0.05
    starts[:, 0] = True
    calls = []
    tokens = cpu_layer.cpu_tokens
    monkeypatch.setattr(cpu_layer, "cpu_tokens", lambda *a: calls.append(1) or tokens(*a))

    def run():
        memory.zero_grad()
        y, state = memory(x, memory.initial_state(4), starts)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        return y.detach(), state, {n: p.grad.clone() for n, p in memory.named_parameters() if p.grad is not None}

    y_native, state_native, grads_native = run()
    assert calls, "the sequence pass did not run the native tokens call"
    monkeypatch.setattr(cpu_layer, "fits", lambda *t: False)
    y_torch, state_torch, grads_torch = run()
    assert_close("y", y_torch, y_native, 1e-5)
    assert_close("S", state_torch.rnn[0], state_native.rnn[0], 1e-5)
    assert torch.equal(state_torch.cache.length, state_native.cache.length)
    assert grads_native.keys() == grads_torch.keys()
    for name in grads_torch:
        assert_close(f"grad {name}", grads_torch[name], grads_native[name], 2e-5)


def _segment(memory, x, state, starts, fused: bool, monkeypatch, state_grads: bool = False):
    """Output, final state, input gradient and parameter gradients of one sequence pass, as one node or op by op."""
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(HybridMemory, "_native_sequence_fits", lambda *a: False)
        memory.zero_grad()
        x = x.clone().requires_grad_()
        y, new = memory(x, state, starts)
        ran = type(y.grad_fn).__name__ == "_LayerSequenceBackward"
        assert ran == fused, f"the pass {'did not run' if fused else 'ran'} as one node"
        loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
        if state_grads:  # a later segment reads the final state: its RNN state and cached keys and values
            loss = loss + 0.3 * new.rnn[0].sum() + (0.7 * new.cache.keys).sum() + new.cache.values.square().sum()
        loss.backward()
    grads = {n: p.grad.clone() for n, p in memory.named_parameters() if p.grad is not None}
    return y.detach(), new, x.grad, grads


@pytest.mark.parametrize(
    "options, carried, state_grads",
    [
        ({}, False, False),
        ({}, True, True),  # a cache and RNN state carried in, rows starting mid-episode; the final state differentiated
        ({"capacity": 3}, True, False),  # evictions: the native capacity replay plans the cache
        ({"threshold": 0.0}, True, True),  # every step cached
        ({"threshold": 1e9}, True, False),  # nothing cached: the attention reads nothing, its output is 0
        ({"gate_bias": 2.0, "score": "cosine"}, True, False),  # the router's other scores, computed natively too
        ({"score": "relative"}, False, False),
    ],
)
def test_memory_sequence_pass_as_one_node_equals_the_pass_op_by_op(monkeypatch, options, carried, state_grads):
    torch.manual_seed(4)
    memory = make_memory("ham", 24, 64, **{"threshold": 0.3, **options})
    B, T = 4, 60
    state = memory.initial_state(B)
    if carried:
        with torch.no_grad():
            _, state = memory(torch.randn(B, 40, 24), state, torch.rand(B, 40) < 0.05)
    x = torch.randn(B, T, 24)
    starts = torch.rand(B, T) < 0.04
    starts[:, 0] = not carried
    y1, s1, dx1, g1 = _segment(memory, x, state, starts, True, monkeypatch, state_grads)
    y0, s0, dx0, g0 = _segment(memory, x, state, starts, False, monkeypatch, state_grads)
    assert_close("y", y0, y1, 1e-5)
    assert_close("dx", dx0, dx1, 1e-5)
    assert g0.keys() == g1.keys() and len(g0) == len(list(memory.parameters()))
    for name in g0:
        assert_close(f"grad {name}", g0[name], g1[name], 2e-5)
    for a, b in zip(s0.rnn, s1.rnn, strict=True):
        assert_close("rnn state", a, b, 1e-5)
    for field in ("keys", "values", "scores", "times", "length"):
        a, b = getattr(s0.cache, field), getattr(s1.cache, field)
        assert a.shape == b.shape and torch.equal(a, b), f"final cache {field}"
    assert torch.equal(s0.episode_len, s1.episode_len)
    if options.get("threshold") == 1e9:
        assert int(s1.cache.length.sum()) == 0
    elif carried:
        assert int(s1.cache.length.min()) > 0


def test_memory_sequence_pass_with_a_bad_input_runs_op_by_op(monkeypatch):
    # A NaN input: the node declines (cpu_layer_sequence returns None) and the pass runs op by op, whose kernels keep
    # the NaN inside its own episode.
    torch.manual_seed(5)
    memory = make_memory("ham", 24, 64, threshold=0.3)
    x = torch.randn(2, 30, 24)
    x[0, 10, 3] = float("nan")
    starts = torch.zeros(2, 30, dtype=torch.bool)
    starts[:, 0] = starts[0, 20] = True
    declined = []
    fused = cpu_sequence.cpu_layer_sequence
    monkeypatch.setattr(cpu_sequence, "cpu_layer_sequence", lambda *a: declined.append(fused(*a) is None) or None)
    y, _ = memory(x, memory.initial_state(2), starts)
    assert declined == [True]
    assert y[0, 10:20].isnan().all() and not y[0, :10].isnan().any() and not y[0, 20:].isnan().any()
    assert not y[1].isnan().any()


def test_memory_sequence_pass_with_a_state_that_needs_gradients_runs_op_by_op(monkeypatch):
    # Backpropagation through a carried-in state (segments chained with their gradients): the node does not take
    # gradients for its inputs' state, so the pass runs op by op and the gradient reaches the earlier segment.
    torch.manual_seed(6)
    memory = make_memory("ham", 24, 64, threshold=0.0)
    starts = torch.zeros(2, 20, dtype=torch.bool)
    starts[:, 0] = True
    x0 = torch.randn(2, 20, 24, requires_grad=True)
    y0, state = memory(x0, memory.initial_state(2), starts)
    assert type(y0.grad_fn).__name__ == "_LayerSequenceBackward"
    y1, _ = memory(torch.randn(2, 20, 24), state, torch.zeros(2, 20, dtype=torch.bool))
    assert type(y1.grad_fn).__name__ != "_LayerSequenceBackward"
    y1.sum().backward()
    assert x0.grad is not None and float(x0.grad.abs().sum()) > 0
