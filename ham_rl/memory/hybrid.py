"""The HAM layer and the memories that fall out of it (gdn, attention, window, hqlt).

One layer, two memories (see ``docs/ham.md`` and the spec it follows): a gated delta-rule RNN reads every
token; a token whose value the RNN predicted badly (surprise ``min_h 1 - cos(v_hat, v) >= tau``) is also
written to the env's KV cache, which softmax attention reads. Two independent sigmoid gates mix the readouts::

    o = sigmoid(W_r x) * o_rnn + sigmoid(W_a x) * o_kv ;   y = W_o RMSNorm(o)

Switching paths and routers off gives the baselines: gdn (RNN only), attention (every token cached, no RNN),
window (the last W tokens), hqlt (RNN + window: the naive hybrid HAM must beat).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ham_rl.kernels.cache_attention import cache_attention
from ham_rl.kernels.gated_delta_rule import gated_delta_rule
from ham_rl.kernels.gated_delta_rule.cpu_recurrent import VECTOR_WIDTHS
from ham_rl.kernels.ham_layer import cpu_layer, cpu_sequence
from ham_rl.kernels.ham_step import SCORES, attention_plan, cpu_step, ham_step, surprise_score
from ham_rl.kernels.native import use_native
from ham_rl.memory.base import Memory
from ham_rl.memory.l2norm import l2norm
from ham_rl.memory.short_conv import FOLD_MAX_INPUTS, ShortConv, folded_short_conv
from ham_rl.memory.state import KVCache, MemoryState

__all__ = ["CONV_PATHS", "HybridMemory", "ROUTERS"]

#: surprise: min over heads of 1 - cos(v_hat, v); learned: sigmoid(MLP(x)); all: every token (window memories)
ROUTERS = ("surprise", "learned", "all")
#: how ``end_update`` moves tau toward ``target_fraction``: ``feedback``, tau += threshold_lr * (f_obs - f);
#: ``quantile``, tau in the widest gap between the (1 - f) and (1 - f/2) quantiles of the last rollout's scores
THRESHOLD_RULES = ("feedback", "quantile")
#: most step() scores the quantile rule keeps between two end_update calls (the newest; older ones are dropped)
_QUANTILE_KEEP = 1 << 20
#: where the short convolution runs: on a path of its own into the readout, or on q, k, v (Gated DeltaNet's place)
CONV_PATHS = ("local", "qkv")


def quantile_threshold(scores: Tensor, fraction: float) -> float:
    """The threshold that caches between ``fraction / 2`` and ``fraction`` of ``scores``, cut at their widest gap.

    A cut at the exact quantile can land inside a cluster of near-equal scores (a periodic stream scores each of its
    symbols alike every cycle), and then the next rollout caches all of the cluster or none of it. The widest gap
    between the two quantiles is where a small drift of the scores changes least; ties are never split.
    """
    scores = scores.detach().float().reshape(-1)
    n = scores.numel()
    most = int(fraction * n)  # fraction is in [0, 1]
    if most == 0:
        return math.inf
    if most == n:
        return -math.inf
    fewest = max(1, -(-most // 2))
    top = torch.topk(scores, most + 1).values  # descending; top[i - 1] > tau >= top[i] caches i
    gaps = top[fewest - 1 : most] - top[fewest : most + 1]  # the cut caching i = fewest .. most
    if float(gaps.max()) <= 0:  # every cut splits one tie: cache only what is above it
        return float(torch.nextafter(top[fewest - 1], torch.tensor(math.inf)))
    i = fewest + int(torch.argmax(gaps))
    return float((top[i - 1] + top[i]) / 2)


class HybridMemory(Memory):
    """Gated delta-rule RNN plus a routed KV cache read by softmax attention.

    :param input_size: features per input step
    :param hidden_size: features per output step; split into ``num_heads`` heads
    :param num_heads: heads of both paths (the routing decision is shared by all heads)
    :param use_rnn: keep the gated delta-rule path
    :param use_attention: keep the KV-cache attention path
    :param router: ``"surprise"`` (HAM), ``"learned"`` (sigmoid MLP with a straight-through factor) or ``"all"``
    :param threshold: tau; a token is cached iff its router score >= tau (+inf: never, -inf: always)
    :param target_fraction: if set, tau is moved after each update (``end_update``) by ``threshold_rule`` so that about
        this fraction of the tokens is cached; by default the feedback rule tau <- tau + threshold_lr * (f_obs - f)
    :param threshold_lr: step size eta of the feedback rule
    :param threshold_rule: ``"feedback"`` (the spec's rule above) or ``"quantile"``: tau is set after each update so
        that between ``target_fraction / 2`` and ``target_fraction`` of the last rollout's step() tokens would have been
        cached, in the widest gap of their scores there (``quantile_threshold``). The feedback rule moves tau by at most
        ``threshold_lr`` in score units per update, so where an update holds many env steps (long episodes) and tau
        starts far from the scores' scale, the cache stays empty for many updates; the quantile rule is on target
        after one update whatever the scale (docs/ham.md)
    :param capacity: most cache entries per env (0: unbounded); a full cache evicts its lowest-score entry
    :param fixed_decay: use decay alpha = 1 instead of the learned gate
    :param conv_size: width of the causal short convolution (0 turns it off). It gives the layer the last few steps
        cheaply (POPGym RepeatPrevious needs it)
    :param score: how the surprise router scores a token: ``"cosine"``, ``min_h 1 - cos(v_hat, v)`` (the spec's,
        scale-free), ``"error"``, the RMS prediction error ``||v - v_hat|| / sqrt(hidden_size)``, which keeps the
        value's scale, or ``"relative"``, ``||v - v_hat|| / ||v||`` over all heads, the error's share of the value, which
        a value that training shrinks does not hide (``kernels/ham_step/reference.py``; docs/ham.md compares them)
    :param conv_path: ``"local"``: the convolution runs on a path of its own, ``SiLU(conv(W_l x))`` added to the
        readout through a per-head gate, so q, k, v and the router's score are the step's own; ``"qkv"``: Gated
        DeltaNet's place, before q, k, v, which mixes each step with its neighbours before keys, values and the
        score are formed (recall at an unknown step is learned 4-8x later, docs/recall.md; the layout before
        2026-12-01)
    :param gate_bias: initial bias of the attention gate (+gate_bias) and of the RNN gate (-gate_bias) when the
        memory has both paths; > 0 starts the readout on the cache, so attention learns to read its entries before
        the RNN path settles the readout (associative recall, docs/ham.md). 0: both gates start at 0.5
    :param attn_sink: initial logit of a null entry (value 0) that every query of the cache attention also sees, or
        None for none. With it an entry that matches the query no better than the sink is read only in part, so
        the attention's output grows with the match instead of jumping to one entry's value as soon as the cache
        holds one (docs/ham.md). The Triton kernels have none: with a sink the PyTorch paths run on a GPU too
    :param time_feature: where the step-in-episode embedding enters: ``False`` (default), ``True`` / ``"input"`` (the
        input: an absolute clock in keys, values, queries and the score, which blocks recall at an unknown step,
        docs/recall.md) or ``"readout"`` (added to the output only, for tasks that need elapsed time)
    """

    has_cache = True

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_heads: int = 4,
        use_rnn: bool = True,
        use_attention: bool = True,
        router: str = "surprise",
        threshold: float = 0.5,
        target_fraction: float | None = None,
        threshold_lr: float = 0.1,
        threshold_rule: str = "feedback",
        capacity: int = 0,
        fixed_decay: bool = False,
        conv_size: int = 4,
        time_feature: bool | str = False,
        conv_path: str = "local",
        score: str = "cosine",
        gate_bias: float = 0.0,
        attn_sink: float | None = None,
    ):
        super().__init__(input_size, hidden_size, time_feature)
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0 or hidden_size % num_heads:
            raise ValueError(f"`num_heads` must be a positive int dividing hidden_size={hidden_size}, got {num_heads!r}")
        if not (use_rnn or use_attention):
            raise ValueError("at least one of `use_rnn` and `use_attention` must be True, got both False")
        if router not in ROUTERS:
            raise ValueError(f"`router` must be one of {', '.join(ROUTERS)}, got {router!r}")
        if router == "surprise" and not use_rnn:
            raise ValueError("`router='surprise'` needs the RNN's prediction; use router='all' when use_rnn=False")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"`capacity` must be an int >= 0 (0 = unbounded), got {capacity!r}")
        if isinstance(conv_size, bool) or not isinstance(conv_size, int) or conv_size < 0:
            raise ValueError(f"`conv_size` must be an int >= 0 (0 = no convolution), got {conv_size!r}")
        if score not in SCORES:
            raise ValueError(f"`score` must be one of {', '.join(SCORES)}, got {score!r}")
        if conv_path not in CONV_PATHS:
            raise ValueError(f"`conv_path` must be one of {', '.join(CONV_PATHS)}, got {conv_path!r}")
        if target_fraction is not None and not 0.0 <= target_fraction <= 1.0:
            raise ValueError(f"`target_fraction` must be in [0, 1] or None, got {target_fraction!r}")
        if not isinstance(threshold, int | float) or math.isnan(threshold):
            raise ValueError(f"`threshold` must be a number (inf allowed), got {threshold!r}")
        if isinstance(gate_bias, bool) or not (isinstance(gate_bias, int | float) and math.isfinite(gate_bias)):
            raise ValueError(f"`gate_bias` must be a finite number, got {gate_bias!r}")
        if attn_sink is not None and (
            isinstance(attn_sink, bool) or not (isinstance(attn_sink, int | float) and math.isfinite(attn_sink))
        ):
            raise ValueError(f"`attn_sink` must be a finite number or None, got {attn_sink!r}")
        if not (isinstance(threshold_lr, int | float) and 0 < threshold_lr < math.inf):
            raise ValueError(f"`threshold_lr` must be a finite number > 0, got {threshold_lr!r}")
        if threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"`threshold_rule` must be one of {', '.join(THRESHOLD_RULES)}, got {threshold_rule!r}")
        self.has_cache = use_attention  # gdn (no attention path) keeps no cache
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.use_rnn, self.use_attention, self.router = use_rnn, use_attention, router
        self.capacity, self.fixed_decay, self.score = capacity, fixed_decay, score
        self.target_fraction, self.threshold_lr = target_fraction, threshold_lr
        self.threshold_rule = threshold_rule
        #: the quantile rule's step() scores since the last end_update ([B] each, newest last)
        self._scores: deque[Tensor] = deque()
        self._scores_kept = 0
        H = num_heads
        self.qkv = nn.Linear(input_size, 3 * hidden_size, bias=False)
        self.conv_path = conv_path if conv_size else None
        # local: its own projection W_l; qkv: the convolution acts on W_qkv x
        self.local = nn.Linear(input_size, hidden_size, bias=False) if self.conv_path == "local" else None
        self.conv = ShortConv(self._conv_channels(), conv_size) if conv_size else None
        # Narrow inputs: the convolution runs folded into its projection (short_conv.py); same parameters.
        self.conv_folded = bool(conv_size) and conv_size * input_size <= FOLD_MAX_INPUTS
        # The per-head scalars of each token (log decay, write strength, the two readout gates) come from one
        # matmul: blocks of H rows in the order of `gate_names`, the decay first so the sigmoids form one block.
        self.gate_names = (
            (("decay",) if use_rnn and not fixed_decay else ()) + (("beta", "gate_rnn") if use_rnn else ())
            + (("gate_attn",) if use_attention else ()) + (("gate_local",) if self.local is not None else ())
        )  # fmt: skip
        self.gates = nn.Linear(input_size, len(self.gate_names) * H)
        if "decay" in self.gate_names:
            # alpha = exp(-softplus(a.x + b)); b spreads the heads' initial decays over timescales ~2..100 steps
            with torch.no_grad():
                rates = torch.logspace(math.log10(0.01), math.log10(0.5), H)
                self.gates.bias[self.gate_block("decay")] = torch.log(torch.expm1(rates))
        if gate_bias and use_rnn and use_attention:
            with torch.no_grad():
                self.gates.bias[self.gate_block("gate_attn")] = float(gate_bias)
                self.gates.bias[self.gate_block("gate_rnn")] = -float(gate_bias)
        if use_attention:
            # q and k are unit vectors, so a learned per-head temperature lets attention become sharp
            self.attn_log_scale = nn.Parameter(torch.full((H,), math.log(8.0)))
        self.attn_sink = nn.Parameter(torch.full((H,), float(attn_sink))) if use_attention and attn_sink is not None else None
        if router == "learned":
            self.router_net = nn.Sequential(nn.Linear(input_size, 32), nn.Tanh(), nn.Linear(32, 1))
        self.norm = nn.RMSNorm(hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.register_buffer("tau", torch.tensor(float(threshold if router != "all" else -math.inf)))
        # Routing counts of step() calls since the last end_update (rollout tokens), for kv_fraction.
        self.register_buffer("_stored", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("_seen", torch.zeros((), dtype=torch.float64), persistent=False)
        #: the compiled ``_step_core`` once ``compile_step`` ran, else None (the eager step)
        self._step_tensors = None

    def _conv_channels(self) -> int:
        return self.hidden_size if self.conv_path == "local" else 3 * self.hidden_size

    def gate_block(self, name: str) -> slice:
        """The rows of ``gates`` that produce ``name`` (one of ``gate_names``), e.g. to inspect or pin a gate."""
        i = self.gate_names.index(name)
        return slice(i * self.num_heads, (i + 1) * self.num_heads)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        conv_w = state_dict.get(prefix + "conv.weight")
        if conv_w is not None and conv_w.shape[-1] != self._conv_channels():
            was = "qkv" if conv_w.shape[-1] == 3 * self.hidden_size else "local"
            # RuntimeError, what load_state_dict raises for a state dict that does not fit (callers catch that)
            raise RuntimeError(
                f"this state dict has its short convolution on conv_path={was!r}, the memory on {self.conv_path!r}; "
                f"build the memory with conv_path={was!r}"
            )
        # Checkpoints from before the gates were one matmul hold beta_proj, decay_proj, gate_rnn, gate_attn Linears.
        old = {"decay": "decay_proj", "beta": "beta_proj", "gate_rnn": "gate_rnn", "gate_attn": "gate_attn"}
        if prefix + "gates.weight" not in state_dict and f"{prefix}{old[self.gate_names[0]]}.weight" in state_dict:
            for kind in ("weight", "bias"):
                blocks = [state_dict.pop(f"{prefix}{old[name]}.{kind}") for name in self.gate_names]
                state_dict[f"{prefix}gates.{kind}"] = torch.cat(blocks)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- threshold -----------------------------------------------------------------------------------------
    @property
    def threshold(self) -> float | None:
        """tau, or None when the memory caches every token (router "all") or has no cache."""
        if not self.use_attention or self.router == "all":
            return None
        return float(self.tau)

    def set_threshold(self, tau: float) -> None:
        """Set tau, e.g. on a trained model to trade return for a smaller cache."""
        if self.threshold is None:
            super().set_threshold(tau)
        if not isinstance(tau, int | float) or math.isnan(tau):
            raise ValueError(f"`threshold` must be a number (inf allowed), got {tau!r}")
        self.tau.fill_(float(tau))

    def end_update(self) -> dict[str, float | None]:
        """Apply the target-fraction feedback rule (if set) to the step() tokens since the last call."""
        seen = float(self._seen)
        fraction = float(self._stored) / seen if seen > 0 and self.use_attention else None
        if fraction is not None and self.target_fraction is not None and self.threshold is not None:
            if self.threshold_rule == "feedback":
                self.tau.add_(self.threshold_lr * (fraction - self.target_fraction))
            elif self._scores:
                self.tau.fill_(quantile_threshold(torch.cat(list(self._scores)), self.target_fraction))
        self._stored.zero_()
        self._seen.zero_()
        self._scores.clear()
        self._scores_kept = 0
        return {"kv_fraction": fraction, "threshold": self.threshold}

    def _keep_scores(self, score: Tensor) -> None:
        """Keep a step()'s scores for the quantile rule, the newest ``_QUANTILE_KEEP`` at most."""
        self._scores.append(score.detach().reshape(-1))
        self._scores_kept += self._scores[-1].numel()
        while self._scores_kept > _QUANTILE_KEEP and len(self._scores) > 1:
            self._scores_kept -= self._scores.popleft().numel()

    # -- state ---------------------------------------------------------------------------------------------
    def _initial_rnn(self, batch_size, device):
        # rnn = (S [B, H, K, V] if use_rnn) + (conv history [B, conv_size - 1, input_size if folded else 3 * hidden])
        dtype = self.qkv.weight.dtype
        out = ()
        if self.use_rnn:
            out += (torch.zeros(batch_size, self.num_heads, self.head_dim, self.head_dim, device=device, dtype=dtype),)
        if self.conv is not None:
            width = self.input_size if self.conv_folded else self._conv_channels()
            out += (self.conv.initial_history(batch_size, width, device, dtype),)
        return out

    def _rnn_spec(self):
        S = ("S [B, num_heads, head_dim, head_dim]", (self.num_heads, self.head_dim, self.head_dim)) if self.use_rnn else None
        what, width = (
            ("input_size", self.input_size)
            if self.conv_folded
            else ("hidden_size" if self.conv_path == "local" else "3 * hidden_size", self._conv_channels())
        )
        history = None if self.conv is None else (f"conv history [B, conv_size - 1, {what}]", (self.conv.size - 1, width))
        return tuple(t for t in (S, history) if t is not None)

    def _cache_dims(self):
        return (self.num_heads, self.head_dim, self.head_dim) if self.use_attention else None

    def _describe(self) -> str:
        conv = f"conv_size={self.conv.size}, conv_path={self.conv_path}" if self.conv else "conv_size=0"
        score = f"score={self.score}, " if self.router == "surprise" else ""
        options = f"num_heads={self.num_heads}, head_dim={self.head_dim}, {score}{conv}"
        return f"HybridMemory(use_rnn={self.use_rnn}, use_attention={self.use_attention}, {options})"

    def _layout_key(self) -> tuple:
        return (self.conv_folded, self.conv_path)

    def _split_rnn(self, rnn: tuple[Tensor, ...]) -> tuple[Tensor | None, Tensor | None]:
        """``(S or None, conv history or None)`` from the state's rnn tuple."""
        S = rnn[0] if self.use_rnn else None
        return S, (rnn[-1] if self.conv is not None else None)

    @staticmethod
    def _join_rnn(S: Tensor | None, history: Tensor | None) -> tuple[Tensor, ...]:
        return tuple(t for t in (S, history) if t is not None)

    def _initial_cache(self, batch_size, device):
        if not self.use_attention:
            return None
        dtype = self.qkv.weight.dtype
        return KVCache.empty(batch_size, self.num_heads, self.head_dim, self.head_dim, 0, device, dtype)

    # -- shared projections --------------------------------------------------------------------------------
    def _project(self, x: Tensor, history: Tensor | None, steps: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        """Per-token quantities for ``x [B, T, input_size]``: q, k, v (and the local path) ``[B, T, H, d]``; gates
        ``[B, T, H]``."""
        convolved = None
        if self.conv is not None:
            proj = self.local if self.local is not None else self.qkv
            if self.conv_folded:
                convolved, history = folded_short_conv(x, history, steps, proj.weight, self.conv.weight, self.conv.bias)
            else:
                convolved, history = self.conv(proj(x), history, steps)
        qkv = convolved if self.conv_path == "qkv" else self.qkv(x)
        p = self._per_token(qkv, self.gates(x))
        if self.local is not None:
            p["local"] = convolved.unflatten(-1, (self.num_heads, self.head_dim))
        if self.router == "learned":
            p["router"] = torch.sigmoid(self.router_net(x)).squeeze(-1)
        elif self.router == "all":
            p["router"] = x.new_zeros(x.shape[:-1])  # equal scores: a full window evicts the oldest
        return p, history

    def _per_token(self, qkv: Tensor, z: Tensor) -> dict[str, Tensor]:
        """``qkv [..., 3 * hidden]`` (after the convolution) and the gate logits ``z [..., n * H]`` -> q, k (unit), v
        ``[..., H, d]`` and the per-head gates ``[..., H]``."""
        H, d = self.num_heads, self.head_dim
        if self.use_attention and self.gate_names[0] == "decay" and cpu_layer.fits(qkv, z, self.attn_log_scale):
            # One native call, forward and backward, for the norms, the gates and the attention's query (the same
            # function as below, with the temperature folded in as _inputs does); "gates" keeps them as one tensor
            # for the native readout.
            lead, G = qkv.shape[:-1], len(self.gate_names)
            qkvn, gates, q_attn = cpu_layer.cpu_tokens(qkv.reshape(-1, 3, H, d), z.reshape(-1, G, H), self.attn_log_scale)
            q, k, v = qkvn.unflatten(0, lead).unbind(-3)
            gates = gates.unflatten(0, lead)
            p = {"q": q, "k": k, "v": v, "q_attn": q_attn.unflatten(0, lead), "gates": gates}
            p.update(zip(("g", *self.gate_names[1:]), gates.unbind(-2), strict=True))
            return p
        # one unbind: its backward stacks the three gradients, where slices' would each fill a zero [..., 3, H, d]
        q, k, v = qkv.unflatten(-1, (3, H, d)).unbind(-3)  # each [..., H, d]
        p = {"q": l2norm(q), "k": l2norm(k), "v": v}  # unit q and k
        if self.gate_names[0] == "decay":
            p["g"], z = -F.softplus(z[..., :H]), z[..., H:]
        sig = torch.sigmoid(z).unflatten(-1, (-1, H)).unbind(-2)
        p.update(zip(self.gate_names[-len(sig) :], sig, strict=True))
        if self.use_rnn and self.fixed_decay:
            p["g"] = torch.zeros_like(p["beta"])
        return p

    def _readout(self, o: Tensor) -> Tensor:
        """``o [..., H, d]`` (gated sum of both paths) -> ``y [..., hidden_size]``."""
        return self.out(self.norm(o.flatten(-2).to(self.out.weight.dtype)))

    def _norm_eps(self) -> float:
        """RMSNorm's eps as the native readouts take it: its float32 default where the module has none."""
        return self.norm.eps if self.norm.eps is not None else torch.finfo(torch.float32).eps

    def _readout_settings(self) -> tuple[tuple[int, int, int], float]:
        """What the native sequence readouts take besides tensors: the rows of the gates that hold the RNN's, the
        attention's and the local path's readout gates, and ``_norm_eps``."""
        return tuple(self.gate_names.index(n) for n in ("gate_rnn", "gate_attn", "gate_local")), self._norm_eps()

    def _readout_native(self, o_rnn: Tensor, o_kv: Tensor, local: Tensor, gates: Tensor) -> Tensor:
        """``_readout(_add_local(p, _gated(p, o_rnn, o_kv)))`` as one native call (forward and backward) before the
        output projection, from the paths ``[B, T, H, d]`` and the gates ``[B, T, G, H]`` of ``cpu_tokens``."""
        H, d, G = self.num_heads, self.head_dim, len(self.gate_names)
        channels, eps = self._readout_settings()
        lead = o_rnn.shape[:-2]
        flat = [t.reshape(-1, H, d) for t in (o_rnn, o_kv.to(o_rnn.dtype), local)]
        y = cpu_layer.cpu_readout(*flat, gates.reshape(-1, G, H), self.norm.weight, channels, eps)
        return self.out(y.unflatten(0, lead))

    # -- sequence form -------------------------------------------------------------------------------------
    def _sequence(self, x, state, starts, steps):
        if self._native_sequence_fits(x, state):
            out = self._sequence_native(x, state, starts, steps)
            if out is not None:  # else an input is not finite: the op-by-op path contains it to its episode
                return out
        return self._sequence_group([self], [x], [state], starts, [steps])[0]

    def _native_layout(self) -> bool:
        """Whether this memory has the layout the native step and sequence calls compute: the HAM layer's own (both
        paths, the surprise router, the local convolution path unfolded, the learned decay)."""
        return (
            self.use_rnn
            and self.use_attention
            and self.router == "surprise"
            and self.conv_path == "local"
            and not self.conv_folded
            and not self.fixed_decay
        )

    def _native_sequence_fits(self, x: Tensor, state: MemoryState) -> bool:
        """Whether the sequence form runs as one autograd node (``cpu_layer_sequence``): ``_native_layout`` without a
        sink, float32 on a CPU outside autocast, and a carried-in state that needs no gradient."""
        cache = state.cache
        return (
            self._native_layout()
            and self.attn_sink is None
            and x.dtype == self.qkv.weight.dtype == cache.keys.dtype == torch.float32
            and self.head_dim in VECTOR_WIDTHS  # the delta rule's vector path
            and not any(t.requires_grad for t in (*state.rnn, cache.keys, cache.values))
            and not torch.is_autocast_enabled(x.device.type)  # its matmuls would run in the autocast dtype
            and use_native(x)
        )

    def _sequence_native(self, x: Tensor, state: MemoryState, starts: Tensor, steps: Tensor):
        """``_sequence`` as one autograd node, or None where an input is not finite."""
        S, history = self._split_rnn(state.rnn)
        cache = state.cache
        weights = cpu_sequence.LayerWeights(
            self.qkv.weight, self.local.weight, self.gates.weight, self.gates.bias, self.conv.weight, self.conv.bias,
            self.attn_log_scale, self.norm.weight, self.out.weight, self.out.bias,
        )  # fmt: skip
        channels, eps = self._readout_settings()
        out = cpu_sequence.cpu_layer_sequence(
            x, weights, starts, steps, S, history, (cache.keys, cache.values, cache.scores, cache.times, cache.length),
            self.tau, self.capacity, self.score, self.num_heads, channels, eps,
        )  # fmt: skip
        if out is None:
            return None
        y, S, history, *cache = out
        return y, MemoryState(rnn=self._join_rnn(S, history), cache=KVCache(*cache), episode_len=state.episode_len)

    def _inputs(self, x: Tensor, state: MemoryState, steps: Tensor) -> tuple[dict[str, Tensor], Tensor | None, Tensor | None]:
        """This memory's per-token quantities for a segment, with its RNN state and conv history: ``(p, S, history)``."""
        S, history = self._split_rnn(state.rnn)
        p, history = self._project(x, history, steps)
        if self.use_attention:
            if "q_attn" not in p:  # the native tokens call folds it in already
                # The per-head temperature is folded into q, so kernels take a plain float scale and autograd does
                # the rest.
                p["q_attn"] = p["q"] * self.attn_log_scale.exp()[:, None]
            if self.attn_sink is not None:
                p["sink"] = self.attn_sink.expand(x.shape[0], -1)  # [B, H]: rows of grouped memories concatenate
        return p, S, history

    @staticmethod
    def _sequence_group(
        memories: Sequence[HybridMemory],
        xs: Sequence[Tensor],
        states: Sequence[MemoryState],
        starts: Tensor,
        steps: Sequence[Tensor],
    ) -> list[tuple[Tensor, MemoryState]]:
        """The sequence form of G memories (G = 1: one memory's own forward) on B rows each.

        Each memory projects its own rows and reads out its own output; the delta rule, routing and attention, which
        read no parameter (``_paths``), run once over the G * B rows.
        """
        first, G, B = memories[0], len(memories), starts.shape[0]
        parts = [m._inputs(x, state, s) for m, x, state, s in zip(memories, xs, states, steps, strict=True)]
        # The local path is each memory's own: it joins the output after the shared ops, so it need not be alike.
        # So are the gates as one tensor, which the native tokens call gives and the native readout takes.
        local = [{n: part[0].pop(n) for n in ("local", "gate_local", "gates") if n in part[0]} for part in parts]
        if G == 1:
            (p, S, _), cache, tau = parts[0], states[0].cache, first.tau
            starts_all, steps_all = starts, steps[0]
        else:
            p = {name: torch.cat([part[0][name] for part in parts]) for name in parts[0][0]}
            S = None if parts[0][1] is None else torch.cat([part[1] for part in parts])
            cache = None if states[0].cache is None else KVCache.cat([state.cache for state in states])
            tau = torch.stack([m.tau for m in memories]).repeat_interleave(B)[:, None]  # [G * B, 1]
            starts_all, steps_all = starts.repeat(G, 1), torch.cat(list(steps))
        o_rnn, o_kv, S, cache = first._paths(p, S, cache, starts_all, steps_all, tau)
        both = o_rnn is not None and o_kv is not None
        native = [both and "gates" in lp and "local" in lp for lp in local]
        o = None if all(native) else first._gated(p, o_rnn, o_kv)
        out = []
        for g, (m, state, (_, _, history)) in enumerate(zip(memories, states, parts, strict=True)):
            rows = slice(g * B, (g + 1) * B)
            cache_g = cache if cache is None or G == 1 else cache[rows].compact()
            rnn = m._join_rnn(None if S is None else S[rows], history)
            if native[g]:
                y = m._readout_native(o_rnn[rows], o_kv[rows], local[g]["local"], local[g]["gates"])
            else:
                y = m._readout(m._add_local(local[g], o[rows]))
            out.append((y, MemoryState(rnn=rnn, cache=cache_g, episode_len=state.episode_len)))
        return out

    @staticmethod
    def _gated(p: dict[str, Tensor], o_rnn: Tensor | None, o_kv: Tensor | None) -> Tensor:
        """``sigmoid(W_r x) * o_rnn + sigmoid(W_a x) * o_kv`` over the paths the memory has."""
        o = 0.0
        if o_rnn is not None:
            o = p["gate_rnn"][..., None] * o_rnn
        if o_kv is not None:
            o = o + p["gate_attn"][..., None] * o_kv
        return o

    @staticmethod
    def _add_local(p: dict[str, Tensor], o: Tensor) -> Tensor:
        """``o + sigmoid(W_l x) * local`` where the memory has the local path (conv_path="local")."""
        if "local" not in p:
            return o
        return o + p["gate_local"][..., None] * p["local"].to(o.dtype)

    def _paths(
        self, p: dict[str, Tensor], S: Tensor | None, cache: KVCache | None, starts: Tensor, steps: Tensor, tau: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, KVCache | None]:
        """Delta rule, routing and attention over projected rows -> ``(o_rnn, o_kv, S, cache)``, None for a missing path.

        Rows are independent and nothing here reads a parameter (``tau`` is a scalar or one per row), only the settings
        in ``_paths_key``, so the rows of several memories with one key can go through it as one batch."""
        o_rnn = o_kv = None
        score = p.get("router")
        if self.use_rnn:
            o_rnn, v_hat, S = gated_delta_rule(p["q"], p["k"], p["v"], p["beta"], p["g"], starts, S)
            if score is None:
                with torch.no_grad():  # the surprise only routes (a hard decision): nothing to record for autograd
                    score = surprise_score(v_hat, p["v"], self.score)  # [B, T]
        if self.use_attention:
            routed = score.detach() >= tau
            candidates, visible, final_source, final_length = attention_plan(
                cache.scores, cache.times, cache.length, starts, steps, score.detach(), routed, self.capacity,
                fifo=self.router == "all",
            )  # fmt: skip
            values = p["v"]
            if self.router == "learned":
                # Straight-through: 1 in the forward pass, d/dr = 1/r so the router learns from attention's use
                values = values * (score / score.detach())[..., None, None]
            if cache.keys.shape[1]:
                keys_all = torch.cat([cache.keys.to(values.dtype), p["k"]], 1)  # [B, L0 + T, H, d]
                values_all = torch.cat([cache.values.to(values.dtype), values], 1)
            else:  # no cache carried in (every row starts its episode here): no copy of the segment's keys and values
                keys_all, values_all = p["k"], values
            # Indexing, not gather: its backward keeps the index only, gather's also keeps the [B, L0 + T] keys
            rows = torch.arange(candidates.shape[0], device=candidates.device)[:, None]
            keys, values = keys_all[rows, candidates], values_all[rows, candidates]
            o_kv = cache_attention(p["q_attn"], keys, values, visible, 1.0, p.get("sink"))
            cache = self._gather_cache(cache, final_source, final_length, keys_all, values_all, score, steps)
        return o_rnn, o_kv, S, cache

    # -- several memories over the same rows (the actor's and the critic's) ----------------------------------
    def _paths_key(self) -> tuple:
        """What ``_paths`` reads of the memory, and the shapes and dtype its rows need to be joined."""
        w = self.qkv.weight
        paths = (self.use_rnn, self.use_attention, self.router, self.score, self.capacity, self.attn_sink is not None)
        return (*paths, self.num_heads, self.head_dim, w.dtype, w.device)

    def _groupable(self, memories: Sequence[Memory]) -> bool:
        key = self._paths_key()
        return all(isinstance(m, HybridMemory) and m._paths_key() == key for m in memories)

    def _forward_group(self, memories, x, states, starts):
        prepared = [m._prepare(x, state, starts) for m, state in zip(memories, states, strict=True)]
        xs, steps = [p[0] for p in prepared], [p[1] for p in prepared]
        out = HybridMemory._sequence_group(memories, xs, states, starts, steps)
        for (_, state), s in zip(out, steps, strict=True):
            state.episode_len = s[:, -1] + 1
        return [(m._add_clock(y, s), state) for m, (y, state), s in zip(memories, out, steps, strict=True)]

    @staticmethod
    def _gather_cache(
        cache: KVCache, src: Tensor, length: Tensor, keys_all: Tensor, values_all: Tensor, score: Tensor, steps: Tensor
    ) -> KVCache:
        """The cache after the segment: the candidates the plan keeps (``src [B, Lf]``), in the step form's slot order."""
        rows = torch.arange(src.shape[0], device=src.device)[:, None]
        scores_all = torch.cat([cache.scores, score.detach().to(cache.scores.dtype)], 1)
        times_all = torch.cat([cache.times, steps], 1)
        return KVCache(
            keys=keys_all[rows, src],  # indexing, as for the candidates: the backward keeps src, not keys_all
            values=values_all[rows, src],
            scores=scores_all.gather(1, src),
            times=times_all.gather(1, src),
            length=length,
        )

    # -- step form -----------------------------------------------------------------------------------------
    def compile_step(self) -> None:
        """Run the step's tensor work (projections, ``ham_step``, readout) as one ``torch.compile``d function.

        Compiled with dynamic shapes, so the cache's growth does not recompile per step; tau is passed as a tensor, so
        the feedback rule's updates do not recompile either. A memory on a GPU keeps its step, already one Triton
        kernel (``kernels/ham_step``).
        """
        if self.qkv.weight.is_cuda:
            return
        self._step_tensors = torch.compile(self._step_core, dynamic=True)

    def _step(self, x, state, start, steps, checked=False):
        S, history = self._split_rnn(state.rnn)
        B, H, d = x.shape[0], self.num_heads, self.head_dim
        compiled = self._step_tensors
        cache, need = state.cache, 1
        if cache is None:  # gdn: a stand-in cache the step op never touches
            cache = KVCache.empty(B, H, d, d, need, x.device, x.dtype)
        else:
            need = min(int(cache.length.max()) + 1, self.capacity + 1 if self.capacity else math.inf)
            # Compiled, one spare slot keeps the views below strided alike at every size (no recompile on contiguity).
            cache = cache.reserve(need + 1 if compiled else need)
        rnn = S if self.use_rnn else x.new_zeros(B, H, d, d)
        native = compiled is None and self._native_step_fits(x)
        used = (cache.keys, cache.values, cache.scores, cache.times)
        if not native:  # only the slots an env can use now, as views (writes land in the cache; the native call reads
            used = [t[:, :need] for t in used]  # no slot past an env's length, and writes at most slot `need - 1`)
        args = (x, rnn, history, *used, cache.length, start, steps, self.tau if compiled else float(self.tau))
        if native:
            y, rnn_new, history, length, score, routed = self._step_native(*args, checked)
        else:
            y, rnn_new, history, length, score, routed = (compiled or self._step_core)(*args)
        if self.use_attention:
            if not native:  # the native step counts them itself
                self._stored.add_(routed.sum())  # in place: `+=` on a buffer also runs Module.__setattr__, every step
                self._seen.add_(B)
            self.__dict__["last_routing"] = (score.detach(), routed)  # not Module.__setattr__'s checks, every step
            if self.threshold_rule == "quantile" and self.target_fraction is not None:
                self._keep_scores(score)
            cache = KVCache(cache.keys, cache.values, cache.scores, cache.times, length)
        else:
            cache = None
        rnn_state = self._join_rnn(rnn_new if self.use_rnn else None, history)
        return y, MemoryState(rnn=rnn_state, cache=cache, episode_len=state.episode_len)

    def _native_step_fits(self, x: Tensor) -> bool:
        """Whether this step runs as one native call (``cpu_layer_step``): ``_native_layout``, float32 on a CPU outside
        autocast, no grad."""
        return (
            self._native_layout()
            and x.dtype == torch.float32
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled(x.device.type)  # its projections would run in the autocast dtype
            and use_native(x)
        )

    def _step_native(self, x, rnn, history, keys, values, scores, times, length, start, steps, tau, checked=False):
        """``_step_core`` and the output projection as one native call (``cpu_layer_step``), which also counts the
        routed steps and the envs into ``_stored`` and ``_seen``; ``checked`` as ``Memory.step``'s."""
        m = self._modules  # the parameters through the module dicts: every rollout step, attribute access costs ~1 us each
        qkv, local, gates, out, conv, norm = (m[n]._parameters for n in ("qkv", "local", "gates", "out", "conv", "norm"))
        eps = self._norm_eps()
        sink = None if self.attn_sink is None else self.attn_sink.expand(x.shape[0], -1)
        return cpu_step.cpu_layer_step(
            x, qkv["weight"], local["weight"], gates["weight"], gates.get("bias"), out["weight"], out.get("bias"),
            history, conv["weight"], conv["bias"], rnn, keys, values, scores, times, length, start, steps, tau,
            self.capacity, self.attn_log_scale, self.score, sink, norm["weight"], eps, self._stored, self._seen, checked,
        )  # fmt: skip

    def _step_core(self, x, rnn, history, keys, values, scores, times, length, start, steps, tau):
        """The step's tensor work: ``(y, rnn state, conv history, length, score, routed)``; the cache slots are
        written in place. Compiled, nothing here reads a tensor's value on the host (the reference's finiteness checks
        step aside under ``torch.compiler.is_compiling()``), so it stays one graph."""
        p, history = self._project(x[:, None], history, steps[:, None])
        p = {name: t[:, 0] for name, t in p.items()}  # [B, 1, ...] -> [B, ...]
        zeros = x.new_zeros(x.shape[0], self.num_heads)
        o, rnn, length, score, routed = ham_step(
            p["q"], p["k"], p["v"], p.get("beta", zeros), p.get("g", zeros),
            p.get("gate_rnn", zeros), p.get("gate_attn", zeros), rnn,
            keys, values, scores, times, length,
            start, steps, tau, self.capacity, p.get("router"),
            self.use_rnn, self.use_attention, self.attn_log_scale.exp() if self.use_attention else None, self.score,
            None if self.attn_sink is None else self.attn_sink.expand(x.shape[0], -1),
        )  # fmt: skip
        o = self._add_local(p, o.to(x.dtype))
        return self._readout(o), rnn, history, length, score, routed
