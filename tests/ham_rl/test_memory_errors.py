"""Bad input raises ValueError naming the bad value and what is allowed."""

import pytest
import torch

from ham_rl import make_memory


def test_unknown_memory_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown memory 'transformer'.*allowed: ham, ham-learned, gdn"):
        make_memory("transformer", 4, 8)


def test_unknown_option_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'capcity'.*allowed:.*capacity"):
        make_memory("ham", 4, 8, capcity=3)


@pytest.mark.parametrize("capacity", [-1, -10, 1.5, True])
def test_bad_capacity(capacity):
    with pytest.raises(ValueError, match=rf"`capacity` must be an int >= 0.*got {capacity!r}"):
        make_memory("ham", 4, 8, capacity=capacity)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"num_heads": 3}, r"`num_heads` must be a positive int dividing hidden_size=8, got 3"),
    ({"target_fraction": 1.5}, r"`target_fraction` must be in \[0, 1\].*got 1.5"),
    ({"threshold": float("nan")}, r"`threshold` must be a number"),
    ({"gate_bias": float("inf")}, r"`gate_bias` must be a finite number, got inf"),
    ({"gate_bias": True}, r"`gate_bias` must be a finite number, got True"),
    ({"attn_sink": float("nan")}, r"`attn_sink` must be a finite number or None, got nan"),
    ({"attn_sink": "high"}, r"`attn_sink` must be a finite number or None, got 'high'"),
])  # fmt: skip
def test_bad_ham_options(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_memory("ham", 4, 8, **kwargs)


@pytest.mark.parametrize("size", [0, -3, 2.5])
def test_bad_sizes(size):
    with pytest.raises(ValueError, match=rf"`input_size` must be a positive int, got {size!r}"):
        make_memory("gru", size, 8)


@pytest.mark.parametrize("name", ["ham", "gru", "mlp"])
def test_wrong_input_size(name):
    mem = make_memory(name, 4, 8)
    state = mem.initial_state(2)
    with pytest.raises(ValueError, match=r"`x` must have shape \[B, T, input_size\] with input_size=4, got \(2, 3, 5\)"):
        mem(torch.randn(2, 3, 5), state, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`x` must have shape \[B, input_size\] with input_size=4, got \(2, 5\)"):
        mem.step(torch.randn(2, 5), state, torch.zeros(2, dtype=torch.bool))


def test_starts_of_wrong_dtype_or_shape():
    mem = make_memory("ham", 4, 8)
    state, x = mem.initial_state(2), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"`starts` must be a bool tensor.*got dtype torch.float32; pass `starts.bool\(\)`"):
        mem(x, state, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"`starts` must have shape \[B, T\] = \(2, 3\) to match x, got \(3, 2\)"):
        mem(x, state, torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`start` must be a bool tensor of shape \[B\], got dtype torch.int64"):
        mem.step(x[:, 0], state, torch.zeros(2, dtype=torch.long))


def test_state_of_wrong_batch_size():
    mem = make_memory("gdn", 4, 8)
    with pytest.raises(ValueError, match=r"`state` must be a MemoryState for B=2 envs, got 3"):
        mem(torch.randn(2, 3, 4), mem.initial_state(3), torch.zeros(2, 3, dtype=torch.bool))


def test_threshold_on_memory_without_router():
    with pytest.raises(ValueError, match=r"GRUMemory has no router"):
        make_memory("gru", 4, 8).set_threshold(0.3)
    assert make_memory("gdn", 4, 8).threshold is None
    assert make_memory("ham", 4, 8, threshold=0.25).threshold == 0.25


def _raises_one_line(pattern: str, fn) -> None:
    with pytest.raises(ValueError, match=pattern) as info:
        fn()
    assert "\n" not in str(info.value), str(info.value)


X, STARTS = torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool)


@pytest.mark.parametrize("memory, state_of, pattern", [
    ("gdn", "ham", r"`state.cache` must be None: HybridMemory\(use_rnn=True, use_attention=False.*no KV cache, got a KVCache"),
    ("ham", "gdn", r"`state.cache` must be a KVCache for HybridMemory\(use_rnn=True, use_attention=True.*, got None;"),
    ("attention", "gdn", r"`state.rnn` must hold 1 tensor\(s\) \(conv history .*\) for HybridMemory\(use_rnn=False.*, got 2"),
    ("lstm", "gru", r"`state.rnn` must hold 2 tensor\(s\) \(h \[B, hidden_size\], c \[B, hidden_size\]\) for LSTMMemory.*1"),
    ("gru", "lstm", r"`state.rnn` must hold 1 tensor\(s\) \(h \[B, hidden_size\]\) for GRUMemory\(hidden_size=8\), got 2"),
    ("mlp", "gru", r"`state.rnn` must hold 0 tensor\(s\) \(none\) for MLPMemory\(hidden_size=8\), got 1"),
    ("gru", "ham", r"`state.rnn` must hold 1 tensor\(s\) .* for GRUMemory\(hidden_size=8\), got 2"),
])  # fmt: skip
@pytest.mark.parametrize("form", ["sequence", "step"])
def test_state_of_another_memory(memory, state_of, pattern, form):
    # the delta-rule family with a short convolution (its state then holds a conv history too)
    conv = lambda name: {"conv_size": 4} if name in ("ham", "gdn", "attention") else {}  # noqa: E731
    mem, state = make_memory(memory, 4, 8, **conv(memory)), make_memory(state_of, 4, 8, **conv(state_of)).initial_state(2)
    call = (lambda: mem(X, state, STARTS)) if form == "sequence" else (lambda: mem.step(X[:, 0], state, STARTS[:, 0]))
    _raises_one_line(pattern, call)


@pytest.mark.parametrize("options, other, pattern", [
    ({"num_heads": 2}, {}, r"`state.rnn\[0\]` \(S \[B, num_heads, head_dim, head_dim\]\) must be a float tensor of shape "
                           r"\(2, 2, 4, 4\) for HybridMemory\(.*num_heads=2, head_dim=4.*, got torch.float32 \(2, 4, 2, 2\)"),
    ({}, {"num_heads": 2}, r"`state.rnn\[0\]` \(S .*\) must be .* shape \(2, 4, 2, 2\) .* got torch.float32 \(2, 2, 4, 4\)"),
    ({"conv_size": 3}, {"conv_size": 4},
     r"`state.rnn\[1\]` \(conv history \[B, conv_size - 1, input_size\]\) must be .* shape \(2, 2, 4\) "
                           r"for HybridMemory\(.*conv_size=3, conv_path=local\), got torch.float32 \(2, 3, 4\)"),
    ({"conv_size": 0}, {"conv_size": 4},
     r"`state.rnn` must hold 1 tensor\(s\) \(S .*\) for HybridMemory\(.*conv_size=0\), got 2"),
])  # fmt: skip
def test_state_of_another_configuration(options, other, pattern):
    mem, state = make_memory("ham", 4, 8, **options), make_memory("ham", 4, 8, **other).initial_state(2)
    _raises_one_line(pattern, lambda: mem(X, state, STARTS))
    _raises_one_line(pattern, lambda: mem.step(X[:, 0], state, STARTS[:, 0]))


def test_state_of_another_hidden_size():
    _raises_one_line(
        r"`state.rnn\[0\]` \(h \[B, hidden_size\]\) must be a float tensor of shape \(2, 8\) for GRUMemory\(hidden_size=8\), "
        r"got torch.float32 \(2, 16\)",
        lambda: make_memory("gru", 4, 8)(X, make_memory("gru", 4, 16).initial_state(2), STARTS),
    )
    state = make_memory("attention", 4, 16).initial_state(2)
    _raises_one_line(
        r"`state.cache.keys` must be \[B, slots, num_heads, head_dim\] = \(2, 0, 4, 2\) for HybridMemory\(.*\), "
        r"got torch.float32 \(2, 0, 4, 4\)",
        lambda: make_memory("attention", 4, 8)(X, state, STARTS),
    )


@pytest.mark.parametrize("conv_path, width, channels", [("local", "hidden_size", 8), ("qkv", "3 \\* hidden_size", 24)])
def test_wide_input_conv_history_has_the_projection_width(conv_path, width, channels):
    # Wide inputs run the convolution on the projections, so the history is [B, conv_size - 1, its channels].
    narrow = make_memory("gdn", 4, 8, conv_size=4, conv_path=conv_path)
    wide = make_memory("gdn", 40, 8, conv_size=4, conv_path=conv_path)
    _raises_one_line(
        rf"`state.rnn\[1\]` \(conv history \[B, conv_size - 1, {width}\]\) must be .* shape \(2, 3, {channels}\)",
        lambda: wide(torch.randn(2, 3, 40), narrow.initial_state(2), STARTS),
    )


def test_state_dict_of_the_other_conv_path_is_refused_in_one_line():
    old = make_memory("ham", 4, 8, conv_path="qkv")
    pattern = r"this state dict has its short convolution on conv_path='qkv', the memory on 'local'; build the memory "
    with pytest.raises(RuntimeError, match=pattern + r"with conv_path='qkv'$"):
        make_memory("ham", 4, 8).load_state_dict(old.state_dict())


def test_unknown_conv_path_is_refused_in_one_line():
    _raises_one_line(r"`conv_path` must be one of local, qkv, got 'q'", lambda: make_memory("ham", 4, 8, conv_path="q"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.bfloat16])
@pytest.mark.parametrize("name", ["ham", "gru", "mlp"])
def test_x_of_another_dtype(name, dtype):
    mem = make_memory(name, 4, 8)
    state = mem.initial_state(2)
    pattern = rf"`x` must have the dtype of the memory's parameters, torch.float32, got {dtype}; pass `x.to\(torch.float32\)`"
    _raises_one_line(pattern, lambda: mem(X.to(dtype), state, STARTS))
    _raises_one_line(pattern, lambda: mem.step(X[:, 0].to(dtype), state, STARTS[:, 0]))


def test_x_of_the_memory_dtype_passes():
    mem = make_memory("ham", 4, 8, num_heads=2)
    mem(X, mem.initial_state(2), STARTS)
    mem.double()  # after a float32 call: the checked dtype follows the parameters
    y, _ = mem(X.double(), mem.initial_state(2), STARTS)
    assert y.dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast runs float32 parameters on other float inputs
        make_memory("gru", 4, 8).step(X[:, 0].bfloat16(), make_memory("gru", 4, 8).initial_state(2), STARTS[:, 0])


@pytest.mark.parametrize("name", ["ham", "gdn", "gru", "mlp"])
def test_empty_sequence(name):
    mem = make_memory(name, 4, 8)
    _raises_one_line(
        r"`x` must hold at least one step \(T >= 1\), got T=0 in shape \(2, 0, 4\)",
        lambda: mem(torch.randn(2, 0, 4), mem.initial_state(2), torch.zeros(2, 0, dtype=torch.bool)),
    )


def test_state_with_bad_bookkeeping():
    mem = make_memory("ham", 4, 8)
    state = mem.initial_state(2)
    state.episode_len = state.episode_len.float()
    _raises_one_line(
        r"`state.episode_len` must be a long tensor of shape \[B\], got torch.float32 \(2,\)", lambda: mem(X, state, STARTS)
    )
    state = mem.initial_state(2)
    state.cache.length = state.cache.length.int()
    _raises_one_line(
        r"`state.cache.length` must be long \[B\] = \(2\) for HybridMemory\(.*\), got torch.int32 \(2,\)",
        lambda: mem(X, state, STARTS),
    )


def test_ham_under_autocast_runs_its_pytorch_ops():
    # The native sequence node and step run their projections inside C++, where autocast would hand the float32
    # kernels bfloat16 tensors: under autocast ham runs its PyTorch ops, forward, backward and step.
    mem = make_memory("ham", 24, 64)  # the layout the native calls take: heads of 16, the convolution unfolded
    x = torch.randn(2, 3, 24)
    y_native, _ = mem(x, mem.initial_state(2), STARTS)
    assert type(y_native.grad_fn).__name__ == "_LayerSequenceBackward", "outside autocast the node runs"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = mem(x, mem.initial_state(2), STARTS)
        assert type(y.grad_fn).__name__ != "_LayerSequenceBackward"
        y.float().sum().backward()
        with torch.no_grad():
            y1, _ = mem.step(x[:, 0], mem.initial_state(2), STARTS[:, 0])
    assert y.dtype == y1.dtype == torch.bfloat16
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mem.parameters())
