"""Environment construction: names -> gymnasium envs, space encoders, the vector env (in-process or in worker
processes), the recall tasks and the passive T-Maze."""

from ham_rl.envs.encoding import SpaceEncoder
from ham_rl.envs.recall_tasks import AssociativeRecallEnv, CueRecallEnv
from ham_rl.envs.registry import ENV_ALIASES, make_env, resolve_env_id, valid_env_names
from ham_rl.envs.tmaze import TMazeEnv
from ham_rl.envs.vector import VecEnv
from ham_rl.envs.workers import WorkerVecEnv, make_vec_env

__all__ = [
    "ENV_ALIASES",
    "AssociativeRecallEnv",
    "CueRecallEnv",
    "SpaceEncoder",
    "TMazeEnv",
    "VecEnv",
    "WorkerVecEnv",
    "make_env",
    "make_vec_env",
    "resolve_env_id",
    "valid_env_names",
]
