"""The trainers that bench/throughput.py and bench/time_to_return.py race, built in one place.

Both benches compare our PPO with sb3-contrib's RecurrentPPO on the same env, number of envs, rollout length and hidden
size. RecurrentPPO runs in one of two settings:

- ``"matched"``: the PPO work of ``cfg`` (minibatches of the same size, the same epochs, learning rate with the same
  annealing, entropy coefficient) and one LSTM shared by actor and critic, as our policy shares its memory;
- ``"defaults"``: everything else at sb3-contrib's defaults (batch 128, 10 epochs, lr 3e-4, a critic LSTM).
"""

from __future__ import annotations

from ham_rl.agents import PPO, PPOConfig, RecurrentActorCritic
from ham_rl.envs import VecEnv, resolve_env_id

SB3_SETTINGS = ("matched", "defaults")


def make_ours(
    env: str, memory: str, hidden: int, cfg: PPOConfig, total_steps: int, seed: int, options: dict | None = None
) -> PPO:
    """Our PPO on ``memory`` with ``options`` (default: HAM memories with 4 heads), seeded, ready to ``iterate()``."""
    import torch

    torch.manual_seed(seed)
    venv = VecEnv(env, cfg.num_envs, seed=seed)
    opts = options if options is not None else ({"num_heads": 4} if memory.startswith("ham") else {})
    agent = RecurrentActorCritic(venv.feature_dim, venv.action_space, memory, hidden, opts)
    return PPO(agent, venv, cfg, total_timesteps=total_steps)


def make_recurrent_ppo(env: str, settings: str, hidden: int, cfg: PPOConfig, seed: int):
    """sb3-contrib's RecurrentPPO with an LSTM of ``hidden`` units on ``cfg``'s envs and rollout length."""
    import popgym  # noqa: F401  (registers the popgym ids)
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.env_util import make_vec_env

    if settings not in SB3_SETTINGS:
        raise ValueError(f"settings must be one of {', '.join(SB3_SETTINGS)}, got {settings!r}")
    kwargs: dict = {}
    arch: dict = {}
    if settings == "matched":
        lr = cfg.learning_rate
        kwargs = dict(
            batch_size=cfg.batch_size // cfg.num_minibatches,
            n_epochs=cfg.update_epochs,
            learning_rate=(lambda progress: progress * lr) if cfg.anneal_lr else lr,  # SB3: progress 1 -> 0
            ent_coef=cfg.ent_coef,
        )
        arch = dict(shared_lstm=True, enable_critic_lstm=False)
    return RecurrentPPO(
        "MlpLstmPolicy",
        make_vec_env(resolve_env_id(env), n_envs=cfg.num_envs, seed=seed),
        n_steps=cfg.num_steps,
        seed=seed,
        device="cpu",
        policy_kwargs=dict(lstm_hidden_size=hidden, **arch),
        **kwargs,
    )
