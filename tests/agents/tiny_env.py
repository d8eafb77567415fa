"""A tiny memory task for tests: remember the first bit of the episode.

obs Discrete(3): the bit (0 or 1) at step 0, then the blank symbol 2. Action Discrete(2). At every later step
the reward is 1/(length-1) if the action equals the first bit, else 0. Random policy: 0.5; perfect: 1.0.
No memory (mlp): at most 0.5 in expectation.
"""

import gymnasium as gym
import numpy as np
from gymnasium import spaces

TINY_ENV_ID = "ham_rl_test/RecallFirst-v0"
#: the same task cut off by a time limit of 3 steps, before the episode's own end at step 5 (truncation, no terminal)
TRUNCATED_ENV_ID = "ham_rl_test/RecallFirstCut-v0"


class RecallFirst(gym.Env):
    def __init__(self, length: int = 6):
        self.length = length
        self.observation_space = spaces.Discrete(3)
        self.action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.bit = int(self.np_random.integers(2))
        self.t = 0
        return self.bit, {}

    def step(self, action):
        self.t += 1
        reward = (1.0 / (self.length - 1)) if int(action) == self.bit else 0.0
        return 2, reward, self.t >= self.length - 1, False, {}


def register_tiny_env() -> str:
    if TINY_ENV_ID not in gym.registry:
        gym.register(TINY_ENV_ID, entry_point=RecallFirst, disable_env_checker=True)
    if TRUNCATED_ENV_ID not in gym.registry:
        gym.register(TRUNCATED_ENV_ID, entry_point=RecallFirst, disable_env_checker=True, max_episode_steps=3)
    return TINY_ENV_ID


_ = np  # numpy is used through self.np_random
