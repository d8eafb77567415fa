"""POPGym RepeatPreviousEasy cut off by a 20-step time limit (truncation); importing it registers the id.

Named ``cut_env:ham_rl_test/RepeatPreviousCut-v0``, so that worker processes import this module and register it too.
"""

import gymnasium as gym

CUT_ENV_ID = "ham_rl_test/RepeatPreviousCut-v0"

if CUT_ENV_ID not in gym.registry:
    gym.register(CUT_ENV_ID, entry_point="popgym.envs.repeat_previous:RepeatPreviousEasy", max_episode_steps=20)
