"""The gated delta rule's fast forms (the native CPU kernel, the chunked PyTorch form, the Triton kernels) against the
naive recurrent reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import assert_close, needs_interpreter

from ham_rl.kernels import native
from ham_rl.kernels.gated_delta_rule import cpu_recurrent as cpu_recurrent_module
from ham_rl.kernels.gated_delta_rule import gated_delta_rule
from ham_rl.kernels.gated_delta_rule import torch_chunk as torch_chunk_module
from ham_rl.kernels.gated_delta_rule.cpu_recurrent import cpu_recurrent_gated_delta_rule
from ham_rl.kernels.gated_delta_rule.naive_chunk import naive_chunk_gated_delta_rule
from ham_rl.kernels.gated_delta_rule.reference import naive_recurrent_gated_delta_rule
from ham_rl.kernels.gated_delta_rule.torch_chunk import torch_chunk_gated_delta_rule

#: the two chunked PyTorch forms: autograd through torch ops, and the hand-written backward (the CPU path)
CHUNKED = {"naive_chunk": naive_chunk_gated_delta_rule, "torch_chunk": torch_chunk_gated_delta_rule}

NAMES = ("o", "v_hat", "final_state", "dq", "dk", "dv", "dbeta", "dg", "dh0")


def _inputs(B, T, H, K, V, dtype, starts_mode, with_h0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1).to(dtype).requires_grad_()
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1).to(dtype).requires_grad_()
    v = torch.randn(B, T, H, V, generator=gen).to(dtype).requires_grad_()
    beta = torch.rand(B, T, H, generator=gen).to(dtype).requires_grad_()
    g = (-torch.rand(B, T, H, generator=gen) * 0.4).to(dtype).requires_grad_()
    h0 = torch.randn(B, H, K, V, generator=gen).requires_grad_() if with_h0 else None
    starts = None
    if starts_mode == "inside":  # episodes begin inside chunks, at t = 0 for one env, several per env
        starts = torch.rand(B, T, generator=gen) < 0.1
        starts[0, min(5, T - 1)] = True
        starts[-1, 0] = True
    elif starts_mode == "first":
        starts = torch.zeros(B, T, dtype=torch.bool)
        starts[:, 0] = True
    return (q, k, v, beta, g), starts, h0


def _run(fn, xs, starts, h0, scale, gen_seed=1):
    o, v_hat, ht = fn(*xs, starts, h0, scale)
    gen = torch.Generator().manual_seed(gen_seed)
    do, dvh = torch.randn(o.shape, generator=gen), torch.randn(v_hat.shape, generator=gen)
    dht = torch.randn(ht.shape, generator=gen)
    leaves = [*xs] + ([h0] if h0 is not None else [])
    loss = (o.float() * do).sum() + (v_hat.float() * dvh).sum() + (ht.float() * dht).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [o, v_hat, ht, *grads]


TORCH_CASES = [
    pytest.param(2, 1, 2, 16, 16, "first", True, 16, id="B2-T1-H2-D16-start"),
    pytest.param(2, 70, 2, 24, 16, "inside", True, 16, id="B2-T70-H2-K24-V16-starts-inside-h0"),
    pytest.param(1, 45, 3, 32, 32, None, False, 32, id="B1-T45-H3-D32-no-starts"),
    pytest.param(2, 64, 1, 64, 64, "inside", True, 64, id="B2-T64-H1-D64-starts-h0-one-chunk"),
]


@pytest.mark.parametrize("form", CHUNKED)
@pytest.mark.parametrize("B, T, H, K, V, starts_mode, with_h0, chunk_size", TORCH_CASES)
def test_chunked_forms_match_recurrent(form, B, T, H, K, V, starts_mode, with_h0, chunk_size):
    xs, starts, h0 = _inputs(B, T, H, K, V, torch.float32, starts_mode, with_h0)
    ref = _run(naive_recurrent_gated_delta_rule, xs, starts, h0, 0.7)
    got = _run(lambda *a: CHUNKED[form](*a, chunk_size=chunk_size), xs, starts, h0, 0.7)
    for name, a, b in zip(NAMES, ref, got, strict=False):
        assert_close(name, a, b, 1e-5)


@pytest.mark.parametrize("form", CHUNKED)
def test_chunked_forms_gradcheck_float64(form):
    xs, starts, h0 = _inputs(1, 9, 1, 4, 3, torch.float64, "inside", True)
    xs = [x.detach().double().requires_grad_() for x in xs]
    h0 = h0.detach().double().requires_grad_()

    def fn(*a):
        return CHUNKED[form](*a[:5], starts, a[5], 0.7, chunk_size=4)

    assert torch.autograd.gradcheck(fn, (*xs, h0))


HAND_WRITTEN = {  # the forms with a hand-written backward, on value widths where they run
    "torch_chunk": (lambda *a: torch_chunk_gated_delta_rule(*a, chunk_size=16), 8),
    "cpu_recurrent": (cpu_recurrent_gated_delta_rule, 16),
}


@pytest.mark.parametrize("form", HAND_WRITTEN)
@pytest.mark.parametrize("used", [("o",), ("v_hat",), ("final_state",), ("o", "final_state")])
def test_hand_written_backward_with_unused_outputs(form, used):
    # HAM's training loss reads o only (v_hat feeds the detached router); a hand-written backward then skips
    # the terms of the unused outputs, and must still give the reference's gradients.
    fast, V = HAND_WRITTEN[form]
    xs, starts, h0 = _inputs(2, 50, 2, 16, V, torch.float32, "inside", True)
    leaves = [*xs, h0]
    grads = []
    for fn in (naive_recurrent_gated_delta_rule, fast):
        outs = dict(zip(("o", "v_hat", "final_state"), fn(*xs, starts, h0, 0.7), strict=True))
        loss = sum((outs[name].float() * torch.linspace(-1, 1, outs[name].numel()).view_as(outs[name])).sum() for name in used)
        got = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads.append([torch.zeros_like(x) if g is None else g for x, g in zip(leaves, got, strict=True)])
    for name, a, b in zip(NAMES[3:], *grads, strict=True):
        assert_close(name, a, b, 1e-5)


@pytest.mark.parametrize("segment_chunks", [1, 2, 3])
@pytest.mark.parametrize("starts_mode, with_h0", [("inside", True), (None, False), ("first", False)])
def test_torch_chunk_segments_recompute_the_same_values_and_gradients(segment_chunks, starts_mode, with_h0):
    # 70 steps in chunks of 8: 9 chunks, so 1, 2 and 3 chunks per segment leave a short last segment or not.
    xs, starts, h0 = _inputs(2, 70, 2, 16, 8, torch.float32, starts_mode, with_h0)
    ref = _run(naive_recurrent_gated_delta_rule, xs, starts, h0, 0.7)
    whole = _run(lambda *a: torch_chunk_gated_delta_rule(*a, chunk_size=8, segment_chunks=16), xs, starts, h0, 0.7)
    seg = _run(lambda *a: torch_chunk_gated_delta_rule(*a, chunk_size=8, segment_chunks=segment_chunks), xs, starts, h0, 0.7)
    for name, a, b, c in zip(NAMES, ref, whole, seg, strict=False):
        assert_close(name, a, c, 1e-5)
        assert_close(name, b, c, 1e-5)


def test_torch_chunk_segments_with_unused_outputs_and_gradcheck():
    xs, starts, h0 = _inputs(1, 11, 1, 4, 3, torch.float64, "inside", True)
    xs = [x.detach().double().requires_grad_() for x in xs]
    h0 = h0.detach().double().requires_grad_()

    def fn(*a):
        return torch_chunk_gated_delta_rule(*a[:5], starts, a[5], 0.7, chunk_size=2, segment_chunks=2)

    assert torch.autograd.gradcheck(fn, (*xs, h0))
    # the training loss reads o only: no v_hat or final-state gradient reaches the segments' backward
    o_seg = fn(*xs, h0)[0]
    got = torch.autograd.grad(o_seg.sum(), [*xs, h0])
    want = torch.autograd.grad(naive_recurrent_gated_delta_rule(*xs, starts, h0, 0.7)[0].sum(), [*xs, h0])
    for name, a, b in zip(NAMES[3:], want, got, strict=True):
        assert_close(name, a, b, 1e-10)


def test_torch_chunk_segments_keep_the_inputs_not_the_intermediates():
    # What the backward holds on to: the chunk algebra's ~20 tensors per token when the input is kept whole,
    # the inputs and one state per segment when it is run in segments.
    xs, starts, _ = _inputs(2, 256, 2, 16, 16, torch.float32, "inside", False)

    def kept_bytes(segment_chunks):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            torch_chunk_gated_delta_rule(*xs, starts, None, 1.0, chunk_size=16, segment_chunks=segment_chunks)
        return sum(seen.values())

    inputs = sum(x.numel() * x.element_size() for x in xs) + starts.numel()
    whole, segmented = kept_bytes(16), kept_bytes(4)
    assert whole > 4 * inputs
    assert kept_bytes(8) == whole  # up to twice a segment's chunks (256 = 2 x 8 x 16 steps) is kept whole
    assert segmented < 1.2 * inputs + 3 * 2 * 2 * 16 * 16 * 4  # the inputs and the states entering segments 2-4


def test_torch_chunk_rejects_a_segment_of_no_chunks():
    xs, starts, _ = _inputs(1, 8, 1, 4, 4, torch.float32, None, False)
    with pytest.raises(ValueError, match="segment_chunks=0"):
        torch_chunk_gated_delta_rule(*xs, starts, None, 1.0, chunk_size=4, segment_chunks=0)


def _count_calls(monkeypatch, function_class) -> list:
    calls = []
    original = function_class.apply
    monkeypatch.setattr(function_class, "apply", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize(
    "choice, runs",
    [
        ("native", cpu_recurrent_module.CpuRecurrentGatedDeltaRuleFunction),
        ("torch", torch_chunk_module.TorchChunkGatedDeltaRuleFunction),
    ],
)
def test_cpu_dispatch_runs_the_chosen_kernel(monkeypatch, choice, runs):
    monkeypatch.setenv("HAM_RL_BACKEND", "auto")
    monkeypatch.setenv("HAM_RL_CPU_KERNEL", choice)
    calls = _count_calls(monkeypatch, runs)
    xs, starts, h0 = _inputs(2, 20, 2, 16, 16, torch.float32, "inside", True)
    ref = _run(naive_recurrent_gated_delta_rule, xs, starts, h0, 1.0)
    got = _run(gated_delta_rule, xs, starts, h0, 1.0)
    assert calls == [1], f"HAM_RL_CPU_KERNEL={choice} did not run {runs.__name__}"
    for name, a, b in zip(NAMES, ref, got, strict=False):
        assert_close(name, a, b, 1e-5)


@pytest.mark.parametrize("V, dtype", [(12, torch.float32), (16, torch.float64)])
def test_cpu_dispatch_runs_the_chunked_form_where_the_native_kernel_has_no_vector_path(monkeypatch, V, dtype):
    monkeypatch.setenv("HAM_RL_CPU_KERNEL", "native")
    calls = _count_calls(monkeypatch, torch_chunk_module.TorchChunkGatedDeltaRuleFunction)
    xs, starts, h0 = _inputs(1, 12, 1, 8, V, dtype, "inside", False)
    gated_delta_rule(*xs, starts, h0)
    assert calls == [1]


def test_cpu_dispatch_rejects_an_unknown_kernel(monkeypatch):
    monkeypatch.setenv("HAM_RL_CPU_KERNEL", "fortran")
    xs, starts, h0 = _inputs(1, 4, 1, 4, 4, torch.float32, None, False)
    with pytest.raises(ValueError, match="HAM_RL_CPU_KERNEL='fortran'.*allowed: native, torch"):
        gated_delta_rule(*xs, starts, h0)


def test_cpu_dispatch_falls_back_to_the_chunked_form_where_the_native_kernel_cannot_build(monkeypatch):
    monkeypatch.setenv("HAM_RL_CPU_KERNEL", "native")
    monkeypatch.setattr(native, "_ops", None)
    monkeypatch.setattr(native, "_error", "could not build the native CPU kernels (no compiler)")
    monkeypatch.setattr(native, "_warned", False)
    calls = _count_calls(monkeypatch, torch_chunk_module.TorchChunkGatedDeltaRuleFunction)
    xs, starts, h0 = _inputs(1, 12, 1, 8, 16, torch.float32, "inside", True)
    with pytest.warns(UserWarning, match="no compiler.*running the PyTorch forms"):
        got = _run(gated_delta_rule, xs, starts, h0, 1.0)
    assert calls == [1]
    ref = _run(naive_recurrent_gated_delta_rule, xs, starts, h0, 1.0)
    for name, a, b in zip(NAMES, ref, got, strict=False):
        assert_close(name, a, b, 1e-5)
    with pytest.raises(RuntimeError, match="no compiler"):
        cpu_recurrent_gated_delta_rule(*xs, starts, h0)


# -- the native CPU kernel ------------------------------------------------------------------------------------
#: float32 with values 16, 32 or 64 wide runs the vector path; other widths and float64 the scalar one. Blocks of 4 or
#: 5 steps put block boundaries on, before and after episode starts.
NATIVE_CASES = [
    pytest.param(2, 1, 2, 16, 16, "first", True, 4, id="B2-T1-H2-D16-start-vec"),
    pytest.param(2, 70, 2, 24, 16, "inside", True, 5, id="B2-T70-H2-K24-V16-starts-inside-h0-vec"),
    pytest.param(3, 33, 2, 16, 16, None, True, 4, id="B3-T33-H2-D16-no-starts-h0-vec"),
    pytest.param(1, 45, 3, 32, 32, None, False, 16, id="B1-T45-H3-D32-no-starts-vec2"),
    pytest.param(2, 30, 1, 8, 64, "inside", True, 4, id="B2-T30-H1-K8-V64-starts-h0-vec4"),
    pytest.param(2, 64, 1, 8, 12, "inside", True, 5, id="B2-T64-H1-K8-V12-starts-h0-scalar"),
]


@pytest.mark.parametrize("B, T, H, K, V, starts_mode, with_h0, block", NATIVE_CASES)
def test_cpu_recurrent_matches_recurrent(B, T, H, K, V, starts_mode, with_h0, block):
    xs, starts, h0 = _inputs(B, T, H, K, V, torch.float32, starts_mode, with_h0)
    ref = _run(naive_recurrent_gated_delta_rule, xs, starts, h0, 0.7)
    got = _run(lambda *a: cpu_recurrent_gated_delta_rule(*a, block=block), xs, starts, h0, 0.7)
    for name, a, b in zip(NAMES, ref, got, strict=False):
        assert_close(name, a, b, 1e-5)


@pytest.mark.parametrize("block", [1, 3, 16])
def test_cpu_recurrent_gradcheck_float64(block):
    xs, starts, h0 = _inputs(2, 9, 1, 4, 3, torch.float64, "inside", True)
    xs = [x.detach().double().requires_grad_() for x in xs]
    h0 = h0.detach().double().requires_grad_()

    def fn(*a):
        return cpu_recurrent_gated_delta_rule(*a[:5], starts, a[5], 0.7, block=block)

    assert torch.autograd.gradcheck(fn, (*xs, h0))


def test_cpu_recurrent_keeps_one_state_per_block():
    # What the backward holds on to: the inputs and T / block states per head, however long the row.
    xs, starts, _ = _inputs(2, 256, 2, 16, 16, torch.float32, "inside", False)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        cpu_recurrent_gated_delta_rule(*xs, starts, None, 1.0, block=16)
    assert sorted(tuple(t.shape) for t in kept) == sorted(
        [(2, 256, 2, 16)] * 3 + [(2, 256, 2)] * 2 + [(2, 256), (2, 2, 16, 16, 16)]
    )  # q, k, v; beta, g; starts; 256 / 16 states per (row, head)
    _, _, _, checkpoints = native.load_native().gdr_forward(
        *(x.detach().contiguous() for x in xs), starts.to(torch.uint8), torch.empty(0), 1.0, 100
    )
    assert checkpoints.shape == (2, 2, 3, 16, 16)  # a short last block


def test_cpu_recurrent_mixed_precision_gradients_match_input_dtypes():
    xs, starts, h0 = _inputs(1, 40, 2, 16, 16, torch.float32, "inside", True)
    q, k, v, beta, g = (x.detach() for x in xs)
    q, k, v = (t.bfloat16().requires_grad_() for t in (q, k, v))  # bfloat16 activations, float32 gates
    beta, g = beta.requires_grad_(), g.requires_grad_()
    o, v_hat, state = cpu_recurrent_gated_delta_rule(q, k, v, beta, g, starts, h0.detach())
    assert o.dtype == v_hat.dtype == torch.bfloat16 and state.dtype == torch.float32
    grads = torch.autograd.grad(o.float().sum(), (q, k, v, beta, g))
    assert [t.dtype for t in grads] == [torch.bfloat16] * 3 + [torch.float32] * 2


@pytest.mark.parametrize("block", [0, -1, 2.5, True])
def test_cpu_recurrent_rejects_a_bad_block(block):
    xs, starts, _ = _inputs(1, 8, 1, 4, 4, torch.float32, None, False)
    with pytest.raises(ValueError, match=f"block={block!r}: must be a positive number of steps"):
        cpu_recurrent_gated_delta_rule(*xs, starts, None, 1.0, block=block)


TRITON_CASES = [
    pytest.param(2, 1, 2, 16, 16, torch.float32, "first", True, 16, id="B2-T1-H2-D16-fp32-start"),
    pytest.param(2, 37, 2, 24, 24, torch.float32, "inside", True, 16, id="B2-T37-H2-D24-fp32-starts-inside-h0"),
    pytest.param(1, 40, 1, 32, 64, torch.float16, None, False, 32, id="B1-T40-H1-K32-V64-fp16"),
    pytest.param(1, 20, 1, 64, 16, torch.float32, "inside", True, 16, id="B1-T20-H1-K64-V16-fp32-starts"),
]


@needs_interpreter
@pytest.mark.parametrize("B, T, H, K, V, dtype, starts_mode, with_h0, chunk_size", TRITON_CASES)
def test_triton_chunk_matches_recurrent(B, T, H, K, V, dtype, starts_mode, with_h0, chunk_size):
    from ham_rl.kernels.gated_delta_rule.chunk import chunk_gated_delta_rule

    xs, starts, h0 = _inputs(B, T, H, K, V, dtype, starts_mode, with_h0)
    ref = _run(naive_recurrent_gated_delta_rule, xs, starts, h0, 0.7)
    got = _run(lambda *a: chunk_gated_delta_rule(*a, chunk_size=chunk_size), xs, starts, h0, 0.7)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    for name, a, b in zip(NAMES, ref, got, strict=False):
        assert_close(name, a, b, tol)


@needs_interpreter
def test_dispatcher_runs_triton_when_forced(monkeypatch):
    import ham_rl.kernels.gated_delta_rule.chunk as chunk_module

    calls = []
    original = chunk_module.ChunkGatedDeltaRuleFunction.apply
    monkeypatch.setattr(chunk_module.ChunkGatedDeltaRuleFunction, "apply", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setenv("HAM_RL_BACKEND", "triton")
    xs, starts, h0 = _inputs(1, 5, 1, 16, 16, torch.float32, "inside", True)
    got = _run(gated_delta_rule, xs, starts, h0, 1.0)
    ref = _run(naive_recurrent_gated_delta_rule, xs, starts, h0, 1.0)
    assert calls, "HAM_RL_BACKEND=triton did not run the Triton kernel"
    for name, a, b in zip(NAMES, ref, got, strict=False):
        assert_close(name, a, b, 1e-5)


def test_torch_chunk_mixed_precision_gradients_match_input_dtypes():
    xs, starts, h0 = _inputs(1, 40, 2, 16, 16, torch.float32, "inside", True)
    q, k, v, beta, g = (x.detach() for x in xs)
    q, k, v = (t.bfloat16().requires_grad_() for t in (q, k, v))  # bfloat16 activations, float32 gates
    beta, g = beta.requires_grad_(), g.requires_grad_()
    o, v_hat, _ = torch_chunk_gated_delta_rule(q, k, v, beta, g, starts, h0.detach(), chunk_size=16)
    assert o.dtype == v_hat.dtype == torch.bfloat16
    grads = torch.autograd.grad(o.float().sum(), (q, k, v, beta, g))
    assert [t.dtype for t in grads] == [torch.bfloat16] * 3 + [torch.float32] * 2
