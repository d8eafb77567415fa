"""Recurrent PPO with sequence minibatches, in the order of CleanRL's ppo_atari_lstm.py.

One iteration = rollout (all envs' memories stepped in one batched ``memory.step`` per env step; the memory state
of every env is stored once, at rollout start) -> GAE -> epochs over minibatches of whole env rows ``[n, T]``,
each replayed with ONE ``memory(x, state0, starts)`` call from the stored start state (truncated BPTT: the state
is detached at segment start) -> clipped PPO loss, value loss, entropy bonus, gradient clipping.

Shapes: B = num_envs, T = num_steps, D = feature_dim. Rollout buffers are ``[T, B, ...]`` while collecting (one
row per step) and ``[B, T, ...]`` (env rows) in the update.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import Tensor, nn

from ham_rl.agents.context import EpisodeContext
from ham_rl.agents.flat_params import FlatParameters
from ham_rl.agents.policy import RecurrentActorCritic
from ham_rl.agents.rng_state import numpy_rng_from_plain, numpy_rng_to_plain, python_rng_from_plain, python_rng_to_plain
from ham_rl.envs import VecEnv
from ham_rl.kernels.ppo_loss import ppo_loss
from ham_rl.memory import MemoryState
from ham_rl.routing import RoutingTrace, informative_flags

__all__ = ["PPO", "PPOConfig", "NonFiniteLossError", "gae"]


class NonFiniteLossError(RuntimeError):
    """The PPO loss became NaN or infinite, or an env gave a NaN or infinite observation or reward."""


def gae(
    rewards: np.ndarray, values: np.ndarray, next_value: np.ndarray, dones: np.ndarray, gamma: float, gae_lambda: float
) -> np.ndarray:
    """Generalized advantage estimates ``[T, B]`` float32 (CleanRL's recursion): ``rewards``, ``values``, ``dones``
    ``[T, B]`` (``dones[t]``: the episode ended at step t), ``next_value [B]`` the value after the last step.

    The same float32 operations in the same order as CleanRL's torch loop, on numpy arrays: a rollout's 200-odd steps
    are some 2,000 small torch ops, each costing more to dispatch than its 32 numbers.
    """
    nonterminal = 1.0 - dones.astype(np.float32)
    advantages = np.zeros_like(rewards, dtype=np.float32)
    lastgaelam = np.zeros_like(next_value, dtype=np.float32)
    for t in reversed(range(len(rewards))):
        nextvalues = next_value if t == len(rewards) - 1 else values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nonterminal[t] - values[t]
        lastgaelam = delta + gamma * gae_lambda * nonterminal[t] * lastgaelam
        advantages[t] = lastgaelam
    return advantages


@dataclass
class PPOConfig:
    """PPO hyperparameters (``configs/agent/ppo.yaml``)."""

    num_envs: int = 32
    """number of envs stepped in parallel (B)"""
    num_steps: int = 64
    """rollout length per env per update (T)"""
    learning_rate: float = 1e-3
    """Adam learning rate (start value when annealed)"""
    anneal_lr: bool = True
    """linearly anneal the learning rate to 0 over the run"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    num_minibatches: int = 8
    """minibatches per epoch; each holds num_envs / num_minibatches whole env rows"""
    update_epochs: int = 4
    """epochs over the rollout per update"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""
    clip_coef: float = 0.2
    """PPO surrogate clipping coefficient"""
    clip_vloss: bool = False
    """clip the value loss like the surrogate"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    target_kl: float | None = None
    """stop the epochs of an update early when approx_kl exceeds this (None: never)"""
    embed_size: int = 64
    """encoder output size (the memory's input size)"""
    head_size: int = 64
    """hidden width of the actor and critic heads"""
    context_steps: int = 256
    """the update replays each env row from the start of the episode in progress at the rollout start, up to this
    many steps back, so the gradient from a step reaches every earlier step of its episode across rollout boundaries
    (episodes up to context_steps + num_steps long); longer episodes replay from the stored state of the oldest kept
    rollout (truncated BPTT). 0: every row from the state at its rollout start"""
    compile: bool = False
    """run the memory's rollout step through ``torch.compile`` (``Memory.compile_step``): ham's step about 2x faster
    on CPU, outputs within float32 round-off, about a minute of compiling at the start (docs/performance.md)"""

    @classmethod
    def from_dict(cls, d: dict) -> PPOConfig:
        """Build from a config mapping; unknown keys raise ValueError listing the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown agent option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError naming the first nonsensical hyperparameter and its allowed range."""

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"agent.{name} must be {rule}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("num_envs", "num_steps", "num_minibatches", "update_epochs", "embed_size", "head_size"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an int >= 1")
        need(is_int(self.context_steps) and self.context_steps >= 0, "context_steps", "an int >= 0")
        need(isinstance(self.compile, bool), "compile", "true or false")
        need(self.learning_rate > 0 and np.isfinite(self.learning_rate), "learning_rate", "a finite float > 0")
        need(0.0 < self.gamma <= 1.0, "gamma", "in (0, 1]")
        need(0.0 <= self.gae_lambda <= 1.0, "gae_lambda", "in [0, 1]")
        need(self.clip_coef > 0, "clip_coef", "> 0")
        need(self.ent_coef >= 0, "ent_coef", ">= 0")
        need(self.vf_coef >= 0, "vf_coef", ">= 0")
        need(self.max_grad_norm > 0, "max_grad_norm", "> 0")
        need(self.target_kl is None or self.target_kl > 0, "target_kl", "None or > 0")
        if self.num_envs % self.num_minibatches:
            raise ValueError(
                f"agent.num_envs ({self.num_envs}) must be divisible by agent.num_minibatches ({self.num_minibatches}): "
                "minibatches are whole env rows"
            )

    @property
    def batch_size(self) -> int:
        """Env steps per update (num_envs * num_steps)."""
        return self.num_envs * self.num_steps


class PPO:
    """Owns the agent, optimizer, vector env, rollout buffers and counters of one training run.

    :param agent: the recurrent actor-critic
    :param venv: the vector env (its number of envs must equal ``cfg.num_envs``)
    :param cfg: PPO hyperparameters
    :param total_timesteps: env steps of the whole run (sets the number of updates and the LR schedule)
    :param device: torch device of the agent
    """

    def __init__(self, agent: RecurrentActorCritic, venv: VecEnv, cfg: PPOConfig, total_timesteps: int, device="cpu"):
        if venv.num_envs != cfg.num_envs:
            raise ValueError(f"venv has {venv.num_envs} envs, agent.num_envs is {cfg.num_envs}")
        if total_timesteps < cfg.batch_size:
            raise ValueError(
                f"total_timesteps ({total_timesteps}) must be >= agent.num_envs * agent.num_steps ({cfg.batch_size})"
            )
        self.agent, self.venv, self.cfg, self.device = agent, venv, cfg, torch.device(device)
        self.total_timesteps = int(total_timesteps)
        self.num_updates = self.total_timesteps // cfg.batch_size
        # The parameters as views of one flat tensor, so that zeroing, clipping and Adam's step are an op or two each
        # (agents/flat_params.py); where they cannot be (a frozen parameter, mixed dtypes), Adam steps each tensor.
        params = list(agent.parameters())
        try:
            self.flat: FlatParameters | None = FlatParameters(params)
        except ValueError:
            self.flat = None
        # fused: one kernel per step for all parameters (the same update; on CPU about 4x cheaper than the loop)
        trained = [self.flat.param] if self.flat is not None else params
        self.optimizer = torch.optim.Adam(trained, lr=cfg.learning_rate, eps=1e-5, fused=True)
        if cfg.compile:
            agent.memory.compile_step()
        T, B, D = cfg.num_steps, cfg.num_envs, venv.feature_dim
        head = agent.action_head
        # rollout buffers [T, B, ...]: numpy for what comes from the env (converted once per rollout), torch for the rest
        self.obs = np.zeros((T, B, D), dtype=np.float32)
        self.starts = np.zeros((T, B), dtype=bool)
        self.rewards = np.zeros((T, B), dtype=np.float32)
        self.dones = np.zeros((T, B), dtype=bool)
        self.actions = torch.zeros((T, B, *head.action_shape), dtype=head.action_dtype, device=self.device)
        self.logprobs = torch.zeros((T, B), device=self.device)
        self.values = torch.zeros((T, B), device=self.device)
        self.cache_len = torch.zeros((T, B), dtype=torch.long, device=self.device)
        # counters and the carried-over env/memory state
        self.update = 0
        self.global_step = 0
        self.next_obs, self.next_start = venv.reset()
        self.state: MemoryState = agent.initial_state(B, device=self.device)
        self.ep_returns: deque[float] = deque(maxlen=100)
        self.ep_lengths: deque[int] = deque(maxlen=100)
        # the last rollouts (whole ones, oldest first) for the episode context of the update, with their start states
        self.context = EpisodeContext(cfg.context_steps, T, B, D, self.device)
        #: when set, each rollout's routing (what the memory cached, and the envs' informative flags) is added to it;
        #: the trainer sets it only around the updates that log a cache picture, as recording costs per step. Not
        #: part of the checkpoint: a resumed run starts a new trace.
        self.routing_trace: RoutingTrace | None = None
        self._routing_buffers: tuple[Tensor, Tensor, np.ndarray] | None = None  # routed, scores, informative [T, B]
        #: under torchrun, the ranks' collectives (ham_rl.distributed.DataParallel): gradients, the finite-loss check,
        #: the target-KL stop and the memory's float buffers are averaged over the ranks, so all stay in step
        self.data_parallel = None

    # ------------------------------------------------------------------------------------------------------------
    def collect_rollout(self) -> dict:
        """Step all envs ``num_steps`` times; returns rollout stats (episodes finished, mean and largest cache length at
        an episode's end)."""
        agent, venv, head, dev = self.agent, self.venv, self.agent.action_head, self.device
        # memory state of every env at rollout start: the update replays each env row from it (a copy, as the rollout
        # steps the memory in place)
        self.state0 = self.state.compact().clone()
        record = self.routing_trace is not None and agent.memory.has_cache
        if record and self._routing_buffers is None:
            T, B = self.starts.shape
            self._routing_buffers = (
                torch.zeros((T, B), dtype=torch.bool, device=dev),
                torch.zeros((T, B), device=dev),
                np.zeros((T, B), dtype=np.int8),
            )
        actions, logprobs, values = [], [], []  # stacked into the buffers after the loop: one op each, not one a step
        with torch.no_grad():
            for t in range(self.cfg.num_steps):
                self._check_finite(self.next_obs, "observation features", t)
                self.obs[t] = self.next_obs
                self.starts[t] = self.next_start
                x = torch.from_numpy(self.next_obs).to(dev)
                start = torch.from_numpy(self.next_start).to(dev)
                # after the first step the memory's state is the one its last step returned, and x and start come from
                # the same env arrays: the memory's checks of them ran at t = 0
                action, logp, value, self.state = agent.step(x, self.state, start, checked=t > 0)
                if record:
                    record = self._record_routing(t)
                actions.append(action)
                logprobs.append(logp)
                values.append(value)
                self.cache_len[t] = self.state.cache_len  # cache length after this step (episode end if done)
                self.next_obs, self.rewards[t], self.dones[t], finished = venv.step(head.to_env(action))
                self._check_finite(self.rewards[t], "reward", t)
                self.next_start = self.dones[t].copy()
                if venv.truncated.any():
                    self.rewards[t] += self._truncation_bootstrap()
                for _, ret, length in finished:
                    self.ep_returns.append(ret)
                    self.ep_lengths.append(length)
            torch.stack(actions, out=self.actions)
            torch.stack(logprobs, out=self.logprobs)
            torch.stack(values, out=self.values)
            # bootstrap value of the observation after the rollout
            self.next_value = agent.value(
                torch.from_numpy(self.next_obs).to(dev), self.state, torch.from_numpy(self.next_start).to(dev)
            )
        self.global_step += self.cfg.batch_size
        if record:
            routed, scores, informative = self._routing_buffers
            self.routing_trace.add_steps(routed.cpu().numpy(), self.starts, self.dones, informative, scores.cpu().numpy())
        dones_t = torch.from_numpy(self.dones).to(dev)
        n_done = int(self.dones.sum())
        has_cache = self.state.cache is not None
        at_end = self.cache_len[dones_t] if n_done and has_cache else None
        kv_len_mean = None if at_end is None else float(at_end.float().mean())
        kv_len_max = None if at_end is None else int(at_end.max())
        return {"episodes": n_done, "kv_len_mean": kv_len_mean, "kv_len_max": kv_len_max}

    def _record_routing(self, t: int) -> bool:
        """Keep step t's routing (the memory's last step) and the informative flags of the observations it read."""
        routing = self.agent.memory.last_routing
        if routing is None:  # a cache without a router: nothing to record
            return False
        routed, scores, informative = self._routing_buffers
        scores[t], routed[t] = routing
        informative[t] = informative_flags(self.venv.infos)  # venv.step has not run yet: the infos of x
        return True

    def _check_finite(self, values: np.ndarray, what: str, t: int) -> None:
        """Stop on a NaN or infinite env output before it reaches the memory (one line naming the env and step)."""
        if np.isfinite(values).all():
            return
        bad = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(1))
        raise NonFiniteLossError(
            f"non-finite {what} from env {int(bad[0])} ({len(bad)} of {len(values)} envs) at env step "
            f"{self.global_step + t * self.cfg.num_envs} (update {self.update + 1}, rollout step {t})"
        )

    def _truncation_bootstrap(self) -> np.ndarray:
        """``gamma * V(last observation)`` for the envs a time limit cut off (0 elsewhere), as SB3 does.

        A truncated episode did not end in a terminal state, so its return continues beyond the cut; the value of
        the last observation, read from the env's memory state, stands in for it.
        """
        cut = np.flatnonzero(self.venv.truncated)
        x = torch.from_numpy(self.venv.final_features[cut]).to(self.device)
        no_start = torch.zeros(len(cut), dtype=torch.bool, device=self.device)
        value = self.agent.value(x, self.state[torch.from_numpy(cut).to(self.device)], no_start)
        bonus = np.zeros(self.cfg.num_envs, dtype=np.float32)
        bonus[cut] = self.cfg.gamma * value.cpu().numpy()
        return bonus

    def compute_advantages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE over the rollout; returns advantages and returns, both ``[T, B]``."""
        values, next_value = self.values.cpu().numpy(), self.next_value.cpu().numpy()
        advantages = gae(self.rewards, values, next_value, self.dones, self.cfg.gamma, self.cfg.gae_lambda)
        advantages = torch.from_numpy(advantages).to(self.device)
        return advantages, advantages + self.values

    def train_step(self, advantages: torch.Tensor, returns: torch.Tensor) -> dict:
        """Epochs over minibatches of whole env rows; one memory sequence call per minibatch."""
        cfg, agent, dev = self.cfg, self.agent, self.device
        # env rows [B, T, ...]
        b_obs = torch.from_numpy(self.obs).to(dev).transpose(0, 1).contiguous()
        b_starts = torch.from_numpy(self.starts).to(dev).transpose(0, 1).contiguous()
        b_actions = self.actions.transpose(0, 1)
        b_logprobs, b_values = self.logprobs.T, self.values.T
        b_advantages, b_returns = advantages.T, returns.T
        envs_per_mb = cfg.num_envs // cfg.num_minibatches
        flat = self.flat
        if flat is not None:
            flat.check_bound()
        clipfracs, approx_kls = [], []
        pg_loss = v_loss = entropy_loss = approx_kl = torch.zeros((), device=dev)
        for _epoch in range(cfg.update_epochs):
            perm = torch.randperm(cfg.num_envs).to(dev)
            rows = self.context.epoch_rows(perm, envs_per_mb, b_obs, b_starts, self.state0, agent)
            # the rollout's rows in this epoch's order, gathered once: each minibatch's are a slice
            e_actions, e_logprobs, e_advantages, e_returns, e_values = (
                t[perm] for t in (b_actions, b_logprobs, b_advantages, b_returns, b_values)
            )
            for (x, state, starts, context), start in zip(rows, range(0, cfg.num_envs, envs_per_mb), strict=True):
                mb = slice(start, start + envs_per_mb)
                newlogprob, entropy, newvalue = agent.evaluate_actions(x, state, starts, e_actions[mb], context)
                # CleanRL's clipped policy loss, clipped value loss and entropy bonus (kernels/ppo_loss/reference.py;
                # one native call on CPU tensors)
                loss, pg_loss, v_loss, entropy_loss, approx_kl, clipfrac = ppo_loss(
                    newlogprob, entropy, newvalue, e_logprobs[mb], e_advantages[mb], e_returns[mb], e_values[mb],
                    cfg.clip_coef, cfg.ent_coef, cfg.vf_coef, cfg.norm_adv, cfg.clip_vloss,
                )  # fmt: skip
                approx_kls.append(approx_kl)
                clipfracs.append(clipfrac)
                if self.data_parallel is None:
                    finite = math.isfinite(loss.item())
                else:  # every rank stops at the same minibatch, none waits for another
                    finite = bool(self.data_parallel.mean(torch.isfinite(loss.detach()).double()).floor())
                if not finite:
                    raise NonFiniteLossError(
                        f"non-finite PPO loss at update {self.update + 1} (pg_loss={float(pg_loss.detach()):.4g}, "
                        f"v_loss={float(v_loss.detach()):.4g}, entropy={float(entropy_loss.detach()):.4g})"
                    )
                if flat is not None:
                    flat.zero_grad()
                    loss.backward()
                    if self.data_parallel is not None:
                        self.data_parallel.average_(flat.grad)
                    flat.clip_grad_norm_(cfg.max_grad_norm)
                else:
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if self.data_parallel is not None:
                        self.data_parallel.gradients(agent.parameters())
                    nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
            kl = approx_kl if self.data_parallel is None or cfg.target_kl is None else self.data_parallel.mean(approx_kl)
            if cfg.target_kl is not None and float(kl) > cfg.target_kl:
                break
        y_pred, y_true = b_values.flatten(), b_returns.flatten()
        var_y = y_true.var()
        explained_var = float("nan") if var_y == 0 else float(1 - (y_true - y_pred).var() / var_y)
        return {
            "train/policy_loss": float(pg_loss.detach()),
            "train/value_loss": float(v_loss.detach()),
            "train/entropy_loss": -float(entropy_loss.detach()),
            "train/approx_kl": float(torch.stack(approx_kls).mean()),
            "train/clip_fraction": float(torch.stack(clipfracs).mean()),
            "train/explained_variance": explained_var,
            "train/learning_rate": self.optimizer.param_groups[0]["lr"],
        }

    def iterate(self) -> dict:
        """One PPO iteration (rollout, GAE, update, memory end_update); returns every stat of it."""
        if self.cfg.anneal_lr:
            frac = 1.0 - self.update / self.num_updates
            self.optimizer.param_groups[0]["lr"] = frac * self.cfg.learning_rate
        t0 = time.perf_counter()
        rollout = self.collect_rollout()
        t1 = time.perf_counter()
        advantages, returns = self.compute_advantages()
        stats = self.train_step(advantages, returns)
        t2 = time.perf_counter()
        self.context.push(self.obs, self.starts, self.state0)
        mem_stats = self.agent.memory.end_update()
        if self.data_parallel is not None:
            self.data_parallel.buffers(self.agent)
        self.update += 1
        stats.update(
            {
                "rollout/ep_rew_mean": float(np.mean(self.ep_returns)) if self.ep_returns else None,
                "rollout/ep_len_mean": float(np.mean(self.ep_lengths)) if self.ep_lengths else None,
                "memory/kv_fraction": mem_stats.get("kv_fraction"),
                "memory/threshold": mem_stats.get("threshold"),
                "memory/kv_len_mean": rollout["kv_len_mean"],
                "memory/kv_len_max": rollout["kv_len_max"],
                "time/rollout_s": t1 - t0,
                "time/update_s": t2 - t1,
            }
        )
        return stats

    # ------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly (at an update boundary), as tensors and plain data only,
        so that a checkpoint loads without unpickling anything (``torch.load(weights_only=True)``)."""
        return {
            "update": self.update,
            "global_step": self.global_step,
            "agent": self.agent.state_dict(),
            "optimizer": self._optimizer_state(),
            "venv": self.venv.state_dict(),
            "memory_state": self.state.state_dict(),
            "next_obs": torch.from_numpy(self.next_obs.copy()),
            "next_start": torch.from_numpy(self.next_start.copy()),
            "ep_returns": [float(r) for r in self.ep_returns],
            "ep_lengths": [int(n) for n in self.ep_lengths],
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": numpy_rng_to_plain(np.random.get_state()),
                "python": python_rng_to_plain(random.getstate()),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            "ppo_config": asdict(self.cfg),
            "context": self.context.state_dict(),
        }

    def _optimizer_state(self) -> dict:
        """The optimizer's state in the layout of Adam over the agent's parameters, however it steps them."""
        state = self.optimizer.state_dict()
        return self.flat.per_parameter_state(state) if self.flat is not None else state

    def load_state_dict(self, data: dict) -> None:
        """Restore what :meth:`state_dict` saved (envs that cannot be restored restart, with a warning)."""
        self.update = int(data["update"])
        self.global_step = int(data["global_step"])
        self.agent.load_state_dict(data["agent"])
        opt = data["optimizer"]
        self.optimizer.load_state_dict(self.flat.flat_state(opt) if self.flat is not None else opt)
        restarted = self.venv.load_state_dict(data["venv"])
        self.state = MemoryState.from_state_dict(data["memory_state"]).to(self.device)
        self.next_obs = data["next_obs"].numpy().copy()
        self.next_start = data["next_start"].numpy().copy()
        if restarted:  # those envs begin a new episode: their features and start flags come from the env now
            features, starts = self.venv.current_features()
            self.next_obs[restarted], self.next_start[restarted] = features[restarted], starts[restarted]
        self.ep_returns = deque(data["ep_returns"], maxlen=100)
        self.ep_lengths = deque(data["ep_lengths"], maxlen=100)
        self.context.load_state_dict(data["context"])
        rng = data["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(numpy_rng_from_plain(rng["numpy"]))
        random.setstate(python_rng_from_plain(rng["python"]))
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
