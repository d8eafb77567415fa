"""Agents: our recurrent PPO (sequence minibatches) and its actor-critic."""

from ham_rl.agents.policy import ActionHead, RecurrentActorCritic, layer_init
from ham_rl.agents.ppo import PPO, NonFiniteLossError, PPOConfig

__all__ = ["PPO", "ActionHead", "NonFiniteLossError", "PPOConfig", "RecurrentActorCritic", "layer_init"]
