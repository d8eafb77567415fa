"""HAMRecurrentPPO: sb3-contrib's RecurrentPPO with HAM (or any memory of the ham_rl family) in place of the LSTM.

What changes against RecurrentPPO, and why:

- the policy builds ``ham_rl.make_memory(...)`` memories instead of nn.LSTMs (:mod:`ham_rl.agents.sb3.policies`);
- the rollout buffer stores each env's memory state once, at the start of the rollout, and minibatches are whole
  env rows, so training runs one memory call per minibatch over all ``n_steps`` steps (:mod:`ham_rl.agents.sb3.buffers`);
- ``collect_rollouts`` keeps a copy of the state the rollout starts from (the memories' step form writes into its
  state in place) and indexes the state per env on time-limit truncation;
- after each update, ``end_update()`` of every memory applies HAM's threshold feedback; its stats are logged as
  ``memory/kv_fraction`` and ``memory/threshold`` (``memory/critic_*`` for the critic's memory), with
  ``memory/kv_len_mean``, the mean cache length at episode end.

``train()``, ``learn()`` and ``save()`` are RecurrentPPO's; ``load()`` rebuilds what SB3 stores pickled from plain data
saved with the model, so loading a file never runs code from it (:mod:`ham_rl.agents.sb3.safe_load`).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback
from stable_baselines3.common.utils import FloatSchedule, obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv

from ham_rl.agents.sb3.buffers import HAMDictRolloutBuffer, HAMRolloutBuffer, envs_per_minibatch
from ham_rl.agents.sb3.policies import (
    LSTM_ARGUMENTS,
    HAMActorCriticCnnPolicy,
    HAMActorCriticPolicy,
    HAMMultiInputActorCriticPolicy,
    clone_states,
)
from ham_rl.agents.sb3.safe_load import plain_model_data, safe_custom_objects
from ham_rl.memory.state import MemoryState

__all__ = ["CnnHamPolicy", "HAMRecurrentPPO", "MlpHamPolicy", "MultiInputHamPolicy"]

MlpHamPolicy = HAMActorCriticPolicy
CnnHamPolicy = HAMActorCriticCnnPolicy
MultiInputHamPolicy = HAMMultiInputActorCriticPolicy

SelfHAMRecurrentPPO = TypeVar("SelfHAMRecurrentPPO", bound="HAMRecurrentPPO")


class HAMRecurrentPPO(RecurrentPPO):
    """
    Recurrent PPO (sb3-contrib's RecurrentPPO, clip version) whose policy memory is HAM or any memory of the
    ham_rl family: ``HAMRecurrentPPO("MlpHamPolicy", env, policy_kwargs=dict(memory="ham", hidden_size=128))``.

    RecurrentPPO: https://sb3-contrib.readthedocs.io/en/master/modules/ppo_recurrent.html
    Whole-row minibatches with the state kept at rollout start follow CleanRL's ``ppo_atari_lstm.py``.

    Takes RecurrentPPO's parameters, with two differences in meaning:

    - ``batch_size`` is rounded to whole env rows: each minibatch holds ``batch_size // n_steps`` envs' complete
      rollouts (at least 1, at most ``n_envs``), so choose ``batch_size`` as a multiple of ``n_steps`` and
      ``n_envs`` as a multiple of the rows per minibatch (otherwise a warning gives the numbers);
    - ``policy_kwargs`` takes ``memory``, ``memory_kwargs``, ``hidden_size``, ``shared_memory`` and
      ``enable_critic_memory`` instead of the LSTM arguments (see :class:`HAMActorCriticPolicy`).

    The state of ``predict`` is an opaque ``MemoryState``: pass back what the last call returned, None to start
    fresh. It is not saved by ``save()`` (as RecurrentPPO's LSTM state is not).

    :param policy: The policy model to use ("MlpHamPolicy", "CnnHamPolicy", "MultiInputHamPolicy" or a subclass of
        HAMActorCriticPolicy)
    :param env: The environment to learn from (if registered in Gym, can be str)
    :param learning_rate: The learning rate, it can be a function of the current progress remaining (from 1 to 0)
    :param n_steps: The number of steps to run for each environment per update (the length of an env row)
    :param batch_size: Minibatch size in steps, rounded to whole env rows (``batch_size // n_steps`` envs)
    :param n_epochs: Number of epoch when optimizing the surrogate loss
    :param gamma: Discount factor
    :param gae_lambda: Factor for trade-off of bias vs variance for Generalized Advantage Estimator
    :param clip_range: Clipping parameter, it can be a function of the current progress remaining (from 1 to 0)
    :param clip_range_vf: Clipping parameter for the value function (None: no clipping)
    :param normalize_advantage: Whether to normalize or not the advantage
    :param ent_coef: Entropy coefficient for the loss calculation
    :param vf_coef: Value function coefficient for the loss calculation
    :param max_grad_norm: The maximum value for the gradient clipping
    :param use_sde: Whether to use generalized State Dependent Exploration (gSDE)
    :param sde_sample_freq: Sample a new noise matrix every n steps when using gSDE (-1: only at rollout start)
    :param target_kl: Limit the KL divergence between updates (None: no limit)
    :param stats_window_size: Window size for the rollout logging (episodes averaged)
    :param tensorboard_log: the log location for tensorboard (if None, no logging)
    :param policy_kwargs: additional arguments to be passed to the policy on creation (memory, memory_kwargs,
        hidden_size, ...)
    :param verbose: the verbosity level: 0 no output, 1 info, 2 debug
    :param seed: Seed for the pseudo random generators
    :param device: Device (cpu, cuda, ...) on which the code should be run ("auto": GPU if possible)
    :param _init_setup_model: Whether or not to build the network at the creation of the instance
    """

    #: compute a critic memory's rollout values in one sequence call after the rollout (False: step it every step)
    defer_critic: bool = True

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpHamPolicy": MlpHamPolicy,
        "CnnHamPolicy": CnnHamPolicy,
        "MultiInputHamPolicy": MultiInputHamPolicy,
    }

    def _get_policy_from_name(self, policy_name: str) -> type[BasePolicy]:
        if policy_name in self.policy_aliases:
            return self.policy_aliases[policy_name]
        raise ValueError(f"unknown policy {policy_name!r} for HAMRecurrentPPO; allowed: {', '.join(self.policy_aliases)}")

    def _setup_model(self) -> None:
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)

        lstm_args = sorted(set(self.policy_kwargs) & set(LSTM_ARGUMENTS))
        if lstm_args:
            hints = "; ".join(f"`{name}` -> {LSTM_ARGUMENTS[name]}" for name in lstm_args)
            raise ValueError(f"policy_kwargs has RecurrentPPO's LSTM argument(s) {', '.join(lstm_args)}; use {hints}")

        self.policy = self.policy_class(
            self.observation_space,
            self.action_space,
            self.lr_schedule,
            use_sde=self.use_sde,
            **self.policy_kwargs,
        )
        self.policy = self.policy.to(self.device)
        if not isinstance(self.policy, HAMActorCriticPolicy):
            raise ValueError(f"the policy must subclass HAMActorCriticPolicy, got {type(self.policy).__name__}")

        # Warn early about a batch_size that is not a whole number of env rows.
        envs_per_minibatch(self.batch_size, self.n_steps, self.n_envs, warn=True)
        self._last_lstm_states = self.policy.initial_states(self.n_envs)
        self._episode_cache_lens: list[th.Tensor] = []

        buffer_cls = HAMDictRolloutBuffer if isinstance(self.observation_space, spaces.Dict) else HAMRolloutBuffer
        self.rollout_buffer = buffer_cls(
            self.n_steps,
            self.observation_space,
            self.action_space,
            self.device,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            n_envs=self.n_envs,
        )

        # what load() rebuilds instead of unpickling (saved as plain JSON with the model)
        self.ham_plain_data = plain_model_data(self)
        # Initialize schedules for policy/value clipping
        self.clip_range = FloatSchedule(self.clip_range)
        if self.clip_range_vf is not None:
            if isinstance(self.clip_range_vf, (float, int)) and self.clip_range_vf <= 0:
                raise ValueError(f"`clip_range_vf` must be positive (None deactivates vf clipping), got {self.clip_range_vf}")
            self.clip_range_vf = FloatSchedule(self.clip_range_vf)

    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """
        Collect experiences using the current policy and fill the rollout buffer (RecurrentPPO's loop; the memory
        state is stored once, at the start of the rollout).

        :param env: The training environment
        :param callback: Callback that will be called at each step (and at the beginning and end of the rollout)
        :param rollout_buffer: Buffer to fill with rollouts (a HAMRolloutBuffer or HAMDictRolloutBuffer)
        :param n_rollout_steps: Number of experiences to collect per environment
        :return: True if function returned with at least `n_rollout_steps` collected, False if callback terminated
            rollout prematurely.
        """
        if not isinstance(rollout_buffer, (HAMRolloutBuffer, HAMDictRolloutBuffer)):
            raise ValueError(
                f"HAMRecurrentPPO needs a HAMRolloutBuffer or HAMDictRolloutBuffer, got {type(rollout_buffer).__name__}"
            )
        assert self._last_obs is not None, "No previous observation was provided"
        self.policy.set_training_mode(False)

        n_steps = 0
        rollout_buffer.reset()
        if self.use_sde:
            self.policy.reset_noise(env.num_envs)

        callback.on_rollout_start()

        # The memories' step form writes into the state's KV cache in place, so the buffer gets a copy of the
        # state from before the rollout's first step; training replays every env row from it.
        initial_states = clone_states(self._last_lstm_states, compact=True)
        lstm_states = self._last_lstm_states
        track_cache = bool(getattr(self.policy.memory_actor, "has_cache", False))
        # A critic with its own memory is not stepped: its values come from one sequence call over the rollout at
        # the end, as in training, and its time-limit bootstraps from one more (see _critic_over_rollout).
        defer_critic = self.defer_critic and self.policy.memory_critic is not None
        truncations: list[tuple[int, int, object]] = []

        while n_steps < n_rollout_steps:
            if self.use_sde and self.sde_sample_freq > 0 and n_steps % self.sde_sample_freq == 0:
                self.policy.reset_noise(env.num_envs)

            with th.inference_mode():
                obs_tensor = obs_as_tensor(self._last_obs, self.device)  # type: ignore[arg-type]
                episode_starts = th.tensor(self._last_episode_starts, dtype=th.float32, device=self.device)
                if defer_critic:
                    distribution, state_pi = self.policy.get_distribution(obs_tensor, lstm_states.pi, episode_starts)
                    actions = distribution.get_actions()
                    log_probs = distribution.log_prob(actions)
                    actions = actions.reshape((-1, *self.action_space.shape))  # type: ignore[misc]
                    values = th.zeros(env.num_envs, 1, device=self.device)  # filled in after the rollout
                    lstm_states = RNNStates(state_pi, lstm_states.vf)
                else:
                    actions, values, log_probs, lstm_states = self.policy(obs_tensor, lstm_states, episode_starts)

            actions = actions.cpu().numpy()
            clipped_actions = actions
            if isinstance(self.action_space, spaces.Box):
                clipped_actions = np.clip(actions, self.action_space.low, self.action_space.high)

            new_obs, rewards, dones, infos = env.step(clipped_actions)

            self.num_timesteps += env.num_envs

            # Give access to local variables
            callback.update_locals(locals())
            if not callback.on_step():
                if defer_critic:  # bring the critic's state up to the steps taken, for a later learn()
                    _, vf = self._critic_over_rollout(rollout_buffer, initial_states.vf, n_steps, [])
                    lstm_states = RNNStates(lstm_states.pi, vf)
                self._last_lstm_states = lstm_states  # the step above already wrote into it
                return False

            self._update_info_buffer(infos, dones)
            n_steps += 1

            if isinstance(self.action_space, spaces.Discrete):
                actions = actions.reshape(-1, 1)

            if track_cache and dones.any():
                self._episode_cache_lens.append(lstm_states.pi.cache_len[th.as_tensor(dones, device=self.device)].cpu())

            # Handle timeout by bootstrapping with the value function (see SB3 issue #633)
            for idx, done_ in enumerate(dones):
                if (
                    done_
                    and infos[idx].get("terminal_observation") is not None
                    and infos[idx].get("TimeLimit.truncated", False)
                ):
                    if defer_critic:
                        truncations.append((n_steps - 1, idx, infos[idx]["terminal_observation"]))
                        continue
                    terminal_obs = self.policy.obs_to_tensor(infos[idx]["terminal_observation"])[0]
                    with th.inference_mode():
                        # env idx's critic state after the last step (predict_values leaves it as it was)
                        vf = lstm_states.vf
                        terminal_state = None if vf is None else vf[idx]
                        episode_starts = th.zeros(1, dtype=th.float32, device=self.device)
                        terminal_value = self.policy.predict_values(terminal_obs, terminal_state, episode_starts)[0]
                    rewards[idx] += self.gamma * terminal_value

            rollout_buffer.add(
                self._last_obs,  # type: ignore[arg-type]
                actions,
                rewards,
                self._last_episode_starts,  # type: ignore[arg-type]
                values,
                log_probs,
                lstm_states=initial_states,
            )

            self._last_obs = new_obs  # type: ignore[assignment]
            self._last_episode_starts = dones
            self._last_lstm_states = lstm_states

        if defer_critic:
            values, vf = self._critic_over_rollout(rollout_buffer, initial_states.vf, n_steps, truncations)
            rollout_buffer.values[:] = values
            lstm_states = self._last_lstm_states = RNNStates(lstm_states.pi, vf)

        with th.inference_mode():
            # Compute value for the last timestep (predict_values leaves the critic state as it was)
            episode_starts = th.tensor(dones, dtype=th.float32, device=self.device)
            values = self.policy.predict_values(obs_as_tensor(new_obs, self.device), lstm_states.vf, episode_starts)  # type: ignore[arg-type]

        rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)

        callback.on_rollout_end()

        return True

    def _critic_over_rollout(
        self, rollout_buffer: HAMRolloutBuffer | HAMDictRolloutBuffer, vf: MemoryState, n_steps: int, truncations: list
    ) -> tuple[np.ndarray, MemoryState]:
        """
        The critic's values for the first ``n_steps`` steps of the rollout, in one sequence call of its memory
        from ``vf`` (its state at the rollout start), and its state after them.

        Stepping the critic's memory during the rollout would cost as much as stepping the actor's, and its
        values are not needed before the rollout ends; the sequence form gives the same values (to round-off)
        and is what training evaluates. Time-limit truncations ``(step, env, terminal_obs)`` add
        ``gamma * V(terminal_obs)`` to that step's reward, V read after the truncated episode's steps: all of
        them in one more sequence call, one row per truncation (the episode's steps in this rollout, then the
        terminal observation; right-padded, which a causal memory never reads).

        :return: values ``[n_steps, n_envs]`` and the critic state after the last step
        """
        obs, starts = rollout_buffer.observation_rows(n_steps)
        with th.inference_mode():
            values, state = self.policy.values_and_state(obs, vf, starts)
            if truncations:
                self._bootstrap_truncations(rollout_buffer, vf, obs, starts, n_steps, truncations)
        values = values.reshape(rollout_buffer.n_envs, n_steps).T
        return values.cpu().numpy(), state

    def _bootstrap_truncations(
        self, rollout_buffer, vf: MemoryState, obs, starts: th.Tensor, n_steps: int, truncations: list
    ) -> None:
        """Add ``gamma * V(terminal_obs)`` to the reward of each truncated step, in one batched critic call."""
        pieces, envs = [], []
        for step, idx, terminal_obs in truncations:
            row = slice(idx * n_steps, idx * n_steps + step + 1)
            begun = starts[row].nonzero()
            first = idx * n_steps + (int(begun[-1]) if len(begun) else 0)  # the episode's first step in the rollout
            episode = slice(first, row.stop)
            last = self.policy.obs_to_tensor(terminal_obs)[0]
            if isinstance(obs, dict):
                piece_obs = {key: th.cat([obs[key][episode], last[key].to(obs[key].dtype)]) for key in obs}
            else:
                piece_obs = th.cat([obs[episode], last.reshape(1, *obs.shape[1:]).to(obs.dtype)])
            pieces.append((piece_obs, th.cat([starts[episode], starts.new_zeros(1)])))
            envs.append(idx)
        lengths = [len(piece_starts) for _, piece_starts in pieces]

        def batch(tensors: list[th.Tensor]) -> th.Tensor:  # [N, L_max, ...] -> env-major [N * L_max, ...]
            padded = th.nn.utils.rnn.pad_sequence(tensors, batch_first=True)
            return padded.reshape(-1, *padded.shape[2:])

        if isinstance(obs, dict):
            batch_obs = {key: batch([piece_obs[key] for piece_obs, _ in pieces]) for key in obs}
        else:
            batch_obs = batch([piece_obs for piece_obs, _ in pieces])
        batch_starts = batch([piece_starts for _, piece_starts in pieces])
        # An episode that began before the rollout continues from the env's state at the rollout start; one that
        # began inside it starts with a reset, so that state is ignored.
        state = vf[th.as_tensor(envs, device=starts.device)]
        values = self.policy.values_and_state(batch_obs, state, batch_starts)[0].reshape(len(pieces), -1)
        for n, ((step, idx, _), length) in enumerate(zip(truncations, lengths, strict=True)):
            rollout_buffer.rewards[step, idx] += self.gamma * values[n, length - 1].item()

    def train(self) -> None:
        """RecurrentPPO's update, then each memory's ``end_update()`` (threshold feedback) and its stats logged."""
        super().train()
        memories = [("", self.policy.memory_actor)]
        if self.policy.memory_critic is not None:
            memories.append(("critic_", self.policy.memory_critic))
        for prefix, memory in memories:
            stats = memory.end_update() if hasattr(memory, "end_update") else None
            for key, value in (stats or {}).items():
                if value is not None:
                    self.logger.record(f"memory/{prefix}{key}", float(value))
        if self._episode_cache_lens:
            self.logger.record("memory/kv_len_mean", th.cat(self._episode_cache_lens).float().mean().item())
            self._episode_cache_lens = []

    def learn(
        self: SelfHAMRecurrentPPO,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "HAMRecurrentPPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfHAMRecurrentPPO:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    @classmethod
    def load(  # type: ignore[override]
        cls: type[SelfHAMRecurrentPPO],
        path: str | Path | io.BufferedIOBase,
        env: GymEnv | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        trust_pickle: bool = False,
        **kwargs: Any,
    ) -> SelfHAMRecurrentPPO:
        """
        Load a saved model without unpickling anything from the file (SB3's own ``load`` would run a crafted file's code).

        The entries SB3 stores pickled are rebuilt from the plain data saved with the model (see ``safe_load.py``);
        ``custom_objects`` still overrides any of them. Arguments as ``BaseAlgorithm.load``, plus:

        :param trust_pickle: unpickle entries that have no plain-data form (older files): only for files you trust
        """
        if not trust_pickle:
            policies = {c.__name__: c for c in {*cls.policy_aliases.values(), HAMActorCriticPolicy}}
            custom_objects = {**safe_custom_objects(path, policies), **(custom_objects or {})}
        return super().load(path, env=env, device=device, custom_objects=custom_objects,
                            print_system_info=print_system_info, force_reset=force_reset, **kwargs)  # fmt: skip

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_episode_cache_lens"]
