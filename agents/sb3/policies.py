"""Actor-critic policies for sb3-contrib's RecurrentPPO whose memory is any memory of the ham_rl family.

The policies subclass :class:`sb3_contrib.common.recurrent.policies.RecurrentActorCriticPolicy`, so everything
RecurrentPPO, ``evaluate_policy`` and SB3's save/load expect of a recurrent policy is there, but the LSTM is replaced
by ``ham_rl.make_memory(memory, ...)``. The memory state travels through SB3 as an opaque
:class:`~ham_rl.memory.state.MemoryState` (inside ``RNNStates(pi, vf)`` during training), never as numpy ``(h, c)`` arrays.

Two forms of the memory are used:

- rollouts and ``predict`` feed one step per env: ``memory.step(x [n_envs, F], state, start [n_envs])``;
- training feeds whole env rows: ``memory(x [n_rows, T, F], state_at_row_start, starts [n_rows, T])``, one call
  per minibatch with no Python loop over time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import (
    BaseFeaturesExtractor,
    CombinedExtractor,
    FlattenExtractor,
    NatureCNN,
)
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from ham_rl.memory import MemoryState, forward_group, make_memory

__all__ = [
    "HAMActorCriticCnnPolicy",
    "HAMActorCriticPolicy",
    "HAMMultiInputActorCriticPolicy",
    "clone_states",
]

#: RecurrentActorCriticPolicy's LSTM arguments and what replaces each here (for the error message)
LSTM_ARGUMENTS = {
    "lstm_hidden_size": "hidden_size",
    "n_lstm_layers": "memory_kwargs (the memory's own options)",
    "shared_lstm": "shared_memory",
    "enable_critic_lstm": "enable_critic_memory",
    "lstm_kwargs": "memory_kwargs",
}


def clone_states(states: RNNStates, compact: bool = False) -> RNNStates:
    """
    A copy of actor and critic memory states that shares no storage with them.

    :param states: ``RNNStates(pi, vf)``; ``vf`` may be ``pi`` itself (shared memory) or None (feed-forward critic)
    :param compact: drop unused KV-cache slots first (for states that are stored)
    :return: the copy, with ``vf is pi`` preserved
    """

    def copy(state: MemoryState) -> MemoryState:
        return (state.compact() if compact else state).clone()

    pi = copy(states.pi)
    if states.vf is None:
        vf = None
    elif states.vf is states.pi:
        vf = pi
    else:
        vf = copy(states.vf)
    return RNNStates(pi, vf)


class HAMActorCriticPolicy(RecurrentActorCriticPolicy):
    """
    Recurrent actor-critic policy whose memory is HAM, or any memory of the ham_rl family, for
    :class:`ham_rl.agents.sb3.HAMRecurrentPPO`. It takes ActorCriticPolicy's arguments, and the memory arguments below in
    place of RecurrentActorCriticPolicy's LSTM ones (``lstm_hidden_size`` -> ``hidden_size``, ``lstm_kwargs`` ->
    ``memory_kwargs``, ``shared_lstm`` -> ``shared_memory``, ``enable_critic_lstm`` -> ``enable_critic_memory``).

    The state that :meth:`predict` takes and returns is the actor memory's :class:`~ham_rl.memory.state.MemoryState` for
    the envs of the observation batch: an opaque object to pass back on the next call (``None`` starts every env
    fresh). ``predict`` never modifies the state it is given.

    :param observation_space: Observation space
    :param action_space: Action space
    :param lr_schedule: Learning rate schedule (could be constant)
    :param net_arch: The specification of the policy and value networks (on top of the memory output)
    :param activation_fn: Activation function
    :param ortho_init: Whether to use or not orthogonal initialization (of the SB3 layers; memories keep their own)
    :param use_sde: Whether to use State Dependent Exploration or not
    :param log_std_init: Initial value for the log standard deviation
    :param full_std: Whether to use (n_features x n_actions) parameters for the std instead of only (n_features,)
        when using gSDE
    :param use_expln: Use ``expln()`` function instead of ``exp()`` to ensure a positive standard deviation
    :param squash_output: Whether to squash the output using a tanh function (gSDE)
    :param features_extractor_class: Features extractor to use (its output is the memory's input)
    :param features_extractor_kwargs: Keyword arguments to pass to the features extractor
    :param share_features_extractor: If True, the features extractor is shared between the policy and value networks
    :param normalize_images: Whether to normalize images or not, dividing by 255.0 (True by default)
    :param optimizer_class: The optimizer to use, ``th.optim.Adam`` by default
    :param optimizer_kwargs: Additional keyword arguments, excluding the learning rate, to pass to the optimizer.
        Adam and AdamW get ``fused=True`` unless these say otherwise: the same update in one kernel for all
        parameters (about 4x cheaper per step on CPU than the per-parameter loop).
    :param memory: Name of the memory, one of ``ham_rl.MEMORIES`` (``"ham"``, ``"gru"``, ``"lstm"``, ...)
    :param memory_kwargs: The memory's options (``ham_rl.memory_options(memory)`` lists them), e.g.
        ``dict(num_heads=4, target_fraction=0.3)`` for HAM
    :param hidden_size: Features per step of the memory output (the LSTM's ``lstm_hidden_size``)
    :param shared_memory: The critic reuses the actor memory's output, detached (only the actor gradient trains the
        memory). Requires ``share_features_extractor`` and ``enable_critic_memory=False``.
    :param enable_critic_memory: Give the critic a memory of its own (same kind and options as the actor's).
        With both this and ``shared_memory`` False, the critic is feed-forward.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.Tanh,
        ortho_init: bool = True,
        use_sde: bool = False,
        log_std_init: float = 0.0,
        full_std: bool = True,
        use_expln: bool = False,
        squash_output: bool = False,
        features_extractor_class: type[BaseFeaturesExtractor] = FlattenExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        share_features_extractor: bool = True,
        normalize_images: bool = True,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        memory: str = "ham",
        memory_kwargs: dict[str, Any] | None = None,
        hidden_size: int = 256,
        shared_memory: bool = False,
        enable_critic_memory: bool = True,
    ):
        if shared_memory and enable_critic_memory:
            raise ValueError(
                "`shared_memory=True` and `enable_critic_memory=True` exclude each other: choose a shared memory, a "
                "separate critic memory, or neither (feed-forward critic)"
            )
        if shared_memory and not share_features_extractor:
            raise ValueError("`shared_memory=True` needs `share_features_extractor=True`, got False")
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"`hidden_size` must be a positive int, got {hidden_size!r}")
        # RecurrentActorCriticPolicy._build_mlp_extractor builds the heads on this width (set before _build runs).
        self.lstm_output_dim = hidden_size
        # Skip RecurrentActorCriticPolicy.__init__, which builds nn.LSTMs; the memories are built below instead.
        ActorCriticPolicy.__init__(
            self,
            observation_space,
            action_space,
            lr_schedule,
            net_arch,
            activation_fn,
            ortho_init,
            use_sde,
            log_std_init,
            full_std,
            use_expln,
            squash_output,
            features_extractor_class,
            features_extractor_kwargs,
            share_features_extractor,
            normalize_images,
            optimizer_class,
            optimizer_kwargs,
        )
        self.memory = memory
        self.memory_kwargs = dict(memory_kwargs or {})
        self.hidden_size = hidden_size
        self.shared_memory = shared_memory
        self.enable_critic_memory = enable_critic_memory

        self.memory_actor = self._make_memory()
        self.memory_critic = self._make_memory() if enable_critic_memory else None
        # Feed-forward critic: map the features to the memory output width, as RecurrentActorCriticPolicy does.
        self.critic = None if (shared_memory or enable_critic_memory) else nn.Linear(self.features_dim, hidden_size)
        # ActorCriticPolicy built its optimizer before the memories existed.
        kwargs = dict(self.optimizer_kwargs)
        if self.optimizer_class in (th.optim.Adam, th.optim.AdamW):
            kwargs.setdefault("fused", True)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **kwargs)

    def _make_memory(self) -> nn.Module:
        try:
            return make_memory(self.memory, input_size=self.features_dim, hidden_size=self.hidden_size, **self.memory_kwargs)
        except ValueError as err:
            raise ValueError(f"policy_kwargs memory={self.memory!r}, memory_kwargs={self.memory_kwargs!r}: {err}") from err
        except TypeError as err:  # a memory's own constructor rejecting an argument
            raise ValueError(f"policy_kwargs memory={self.memory!r}, memory_kwargs={self.memory_kwargs!r}: {err}") from err

    @classmethod
    def load(cls, path: str, device: th.device | str = "auto", trust_pickle: bool = False) -> HAMActorCriticPolicy:
        """
        SB3's policy file is a full pickle (spaces, schedules, classes), so loading it can run code from the file:
        refused unless ``trust_pickle=True``. ``HAMRecurrentPPO.save``/``load`` keep a model without that risk.
        """
        if not trust_pickle:
            raise ValueError(
                f"loading the policy file {path} would unpickle it (it could run code); save and load the model with "
                "HAMRecurrentPPO.save/load instead, or pass trust_pickle=True for a file you trust"
            )
        return super().load(path, device)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            memory=self.memory,
            memory_kwargs=self.memory_kwargs,
            hidden_size=self.hidden_size,
            shared_memory=self.shared_memory,
            enable_critic_memory=self.enable_critic_memory,
        )
        return data

    # -- memory states ---------------------------------------------------------------------------------------
    def initial_states(self, n_envs: int) -> RNNStates:
        """Fresh states for ``n_envs`` envs: ``RNNStates(pi, vf)``; ``vf`` is ``pi`` for a shared memory and None
        for a feed-forward critic."""
        pi = self.memory_actor.initial_state(n_envs, device=self.device)
        if self.memory_critic is not None:
            vf = self.memory_critic.initial_state(n_envs, device=self.device)
        else:
            vf = pi if self.shared_memory else None
        return RNNStates(pi, vf)

    def _process_sequence(  # type: ignore[override]
        self,
        features: th.Tensor,
        state: MemoryState,
        episode_starts: th.Tensor,
        memory: nn.Module,
        inplace: bool = False,
    ) -> tuple[th.Tensor, MemoryState]:
        """
        Run the memory over env-major features.

        :param features: ``[B * T, F]``, env b's T steps contiguous (rollout: T = 1; training: whole env rows)
        :param state: the memory state of the B envs before the first of the T steps
        :param episode_starts: ``[B * T]`` float or bool, 1 where a step begins a new episode
        :param memory: the actor's or the critic's memory
        :param inplace: let the step form write into ``state``'s cache (rollouts, which replace the state at once)
        :return: the memory output ``[B * T, hidden_size]`` and the state after the last step
        """
        n_rows = state.batch_size
        x = features.reshape(n_rows, -1, memory.input_size)  # [B * T, F] -> [B, T, F]
        starts = episode_starts.reshape(n_rows, -1).bool()  # [B, T]
        if x.shape[1] == 1:
            y, state = memory.step(x[:, 0], state, starts[:, 0], inplace=inplace)
            return y, state
        y, state = memory(x, state, starts)  # one call over the whole rows
        return y.reshape(-1, memory.hidden_size), state

    def _process_pair(self, features: th.Tensor, states: RNNStates, episode_starts: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """The actor's and the critic's memory outputs ``[B * T, hidden_size]`` over the same whole env rows."""
        memories = (self.memory_actor, self.memory_critic)
        n_rows = states.pi.batch_size
        x = features.reshape(n_rows, -1, self.memory_actor.input_size)  # [B * T, F] -> [B, T, F]
        starts = episode_starts.reshape(n_rows, -1).bool()
        (y_pi, _), (y_vf, _) = forward_group(memories, x, [states.pi, states.vf], starts)
        return y_pi.reshape(-1, self.hidden_size), y_vf.reshape(-1, self.hidden_size)

    def _latent_vf(
        self,
        vf_features: th.Tensor,
        state: MemoryState | None,
        episode_starts: th.Tensor,
        latent_pi: th.Tensor | None,
        inplace: bool = False,
    ) -> tuple[th.Tensor, MemoryState | None]:
        """The critic's memory output (own memory, detached actor output, or feed-forward)."""
        if self.memory_critic is not None:
            return self._process_sequence(vf_features, state, episode_starts, self.memory_critic, inplace)
        if self.shared_memory:
            if latent_pi is None:  # predict_values: run the actor memory
                latent_pi, state = self._process_sequence(vf_features, state, episode_starts, self.memory_actor, inplace)
            return latent_pi.detach(), state
        return self.critic(vf_features), None

    # -- RecurrentActorCriticPolicy's interface ----------------------------------------------------------------
    def forward(
        self,
        obs: th.Tensor,
        lstm_states: RNNStates,
        episode_starts: th.Tensor,
        deterministic: bool = False,
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor, RNNStates]:
        """
        Forward pass in all the networks (actor and critic).

        :param obs: Observation
        :param lstm_states: ``RNNStates(pi, vf)`` of memory states; the rollout's, so the step form writes into their
            caches (store ``clone_states(lstm_states)`` to keep them)
        :param episode_starts: Whether the observations start new episodes (the memory resets those envs)
        :param deterministic: Whether to sample or use deterministic actions
        :return: action, value, log probability of the action and the new memory states
        """
        features = self.extract_features(obs)
        pi_features, vf_features = (features, features) if self.share_features_extractor else features
        latent_pi, state_pi = self._process_sequence(pi_features, lstm_states.pi, episode_starts, self.memory_actor, True)
        latent_vf, state_vf = self._latent_vf(vf_features, lstm_states.vf, episode_starts, latent_pi, inplace=True)
        if self.shared_memory:
            state_vf = state_pi
        latent_pi = self.mlp_extractor.forward_actor(latent_pi)
        latent_vf = self.mlp_extractor.forward_critic(latent_vf)
        values = self.value_net(latent_vf)
        distribution = self._get_action_dist_from_latent(latent_pi)
        actions = distribution.get_actions(deterministic=deterministic)
        log_prob = distribution.log_prob(actions)
        actions = actions.reshape((-1, *self.action_space.shape))  # type: ignore[misc]
        return actions, values, log_prob, RNNStates(state_pi, state_vf)

    def get_distribution(  # type: ignore[override]
        self, obs: th.Tensor, lstm_states: MemoryState, episode_starts: th.Tensor
    ) -> tuple[Distribution, MemoryState]:
        """
        The policy distribution given the observations.

        :param obs: Observation
        :param lstm_states: the actor memory's state; the rollout's, so the step form writes into its cache
        :param episode_starts: Whether the observations start new episodes
        :return: the action distribution and the new actor memory state
        """
        features = super(ActorCriticPolicy, self).extract_features(obs, self.pi_features_extractor)
        latent_pi, state = self._process_sequence(features, lstm_states, episode_starts, self.memory_actor, inplace=True)
        latent_pi = self.mlp_extractor.forward_actor(latent_pi)
        return self._get_action_dist_from_latent(latent_pi), state

    def predict_values(  # type: ignore[override]
        self, obs: th.Tensor, lstm_states: MemoryState | None, episode_starts: th.Tensor
    ) -> th.Tensor:
        """
        The estimated values given the observations.

        :param obs: Observation
        :param lstm_states: the critic memory's state (the actor's for a shared memory; ignored for a
            feed-forward critic); left as it was.
        :param episode_starts: Whether the observations start new episodes
        :return: the estimated values
        """
        return self.values_and_state(obs, lstm_states, episode_starts)[0]

    def values_and_state(
        self, obs: th.Tensor, lstm_states: MemoryState | None, episode_starts: th.Tensor
    ) -> tuple[th.Tensor, MemoryState | None]:
        """
        :meth:`predict_values`, also returning the critic memory's state after the last step.

        :param obs: Observation ``[B * T, ...]``, env-major (T = 1: the step form; T > 1: one sequence call)
        :param lstm_states: the critic memory's state of the B envs before the first step
        :param episode_starts: Whether each step starts a new episode ``[B * T]``
        :return: the estimated values ``[B * T, 1]`` and the state after the last step
        """
        features = super(ActorCriticPolicy, self).extract_features(obs, self.vf_features_extractor)
        latent_vf, state = self._latent_vf(features, lstm_states, episode_starts, None)
        return self.value_net(self.mlp_extractor.forward_critic(latent_vf)), state

    def evaluate_actions(
        self, obs: th.Tensor, actions: th.Tensor, lstm_states: RNNStates, episode_starts: th.Tensor
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """
        Evaluate actions on whole env rows (the training pass: one memory call per memory).

        :param obs: Observation ``[B * T, ...]``, env-major
        :param actions: the actions taken
        :param lstm_states: ``RNNStates(pi, vf)``, the memory states of the B envs before the rows
        :param episode_starts: Whether each step starts a new episode ``[B * T]``
        :return: estimated value, log likelihood of taking those actions and entropy of the action distribution
        """
        features = self.extract_features(obs)
        pi_features, vf_features = (features, features) if self.share_features_extractor else features
        if self.memory_critic is not None and self.share_features_extractor:
            # Both memories read the same rows: one grouped call where the memory supports it (see forward_group).
            latent_pi, latent_vf = self._process_pair(features, lstm_states, episode_starts)
        else:
            latent_pi, _ = self._process_sequence(pi_features, lstm_states.pi, episode_starts, self.memory_actor)
            latent_vf, _ = self._latent_vf(vf_features, lstm_states.vf, episode_starts, latent_pi)
        latent_pi = self.mlp_extractor.forward_actor(latent_pi)
        latent_vf = self.mlp_extractor.forward_critic(latent_vf)
        distribution = self._get_action_dist_from_latent(latent_pi)
        return self.value_net(latent_vf), distribution.log_prob(actions), distribution.entropy()

    def predict(  # type: ignore[override]
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: MemoryState | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, MemoryState]:
        """
        The policy action from an observation, and the memory state to pass back next time.

        :param observation: the input observation (one env, or a batch of n_envs)
        :param state: the state returned by the previous call (an opaque
            :class:`~ham_rl.memory.state.MemoryState`), or None to start every env fresh. It is not modified.
        :param episode_start: ``[n_envs]`` bools, True where an env starts a new episode (its memory is reset)
        :param deterministic: Whether or not to return deterministic actions
        :return: the model's action and the next memory state
        """
        self.set_training_mode(False)
        observation, vectorized_env = self.obs_to_tensor(observation)
        if isinstance(observation, dict):
            n_envs = observation[next(iter(observation.keys()))].shape[0]
        else:
            n_envs = observation.shape[0]

        if state is None:
            state = self.memory_actor.initial_state(n_envs, device=self.device)
        elif not isinstance(state, MemoryState):
            raise ValueError(
                f"`state` must be None or the state a previous predict() returned (a ham_rl MemoryState), got "
                f"{type(state).__name__}; LSTM (h, c) arrays from RecurrentPPO do not carry over"
            )
        elif state.batch_size != n_envs:
            raise ValueError(f"`state` holds {state.batch_size} envs but the observation has {n_envs}")
        else:
            state = state.to(self.device)

        if episode_start is None:
            episode_start = np.zeros(n_envs, dtype=bool)
        with th.no_grad():
            episode_starts = th.as_tensor(np.asarray(episode_start), device=self.device).reshape(n_envs).bool()
            actions, state = self._predict(observation, state, episode_starts, deterministic=deterministic)

        actions = actions.cpu().numpy().reshape((-1, *self.action_space.shape))  # type: ignore[assignment]
        if isinstance(self.action_space, spaces.Box):
            if self.squash_output:
                actions = self.unscale_action(actions)
            else:
                actions = np.clip(actions, self.action_space.low, self.action_space.high)
        if not vectorized_env:
            actions = actions.squeeze(axis=0)
        return actions, state


class HAMActorCriticCnnPolicy(HAMActorCriticPolicy):
    """:class:`HAMActorCriticPolicy` with a NatureCNN features extractor (image observations); same parameters."""

    def __init__(self, *args: Any, features_extractor_class: type[BaseFeaturesExtractor] = NatureCNN, **kwargs: Any):
        super().__init__(*args, features_extractor_class=features_extractor_class, **kwargs)


class HAMMultiInputActorCriticPolicy(HAMActorCriticPolicy):
    """:class:`HAMActorCriticPolicy` with a CombinedExtractor (Dict observations); same parameters."""

    def __init__(self, *args: Any, features_extractor_class: type[BaseFeaturesExtractor] = CombinedExtractor, **kwargs: Any):
        super().__init__(*args, features_extractor_class=features_extractor_class, **kwargs)
