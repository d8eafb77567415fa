"""Environment construction: names -> gymnasium envs, space encoders, the in-process vector env."""

from envs.encoding import SpaceEncoder
from envs.registry import ENV_ALIASES, make_env, resolve_env_id, valid_env_names
from envs.vector import VecEnv

__all__ = ["ENV_ALIASES", "SpaceEncoder", "VecEnv", "make_env", "resolve_env_id", "valid_env_names"]
