"""HAM (or any memory of the ham_rl family) as the memory of sb3-contrib's RecurrentPPO.

>>> from ham_rl.sb3 import HAMRecurrentPPO
>>> model = HAMRecurrentPPO("MlpHamPolicy", "popgym-RepeatPreviousEasy-v0", policy_kwargs=dict(memory="ham"))
"""

from ham_rl.agents.sb3.buffers import HAMDictRolloutBuffer, HAMRolloutBuffer
from ham_rl.agents.sb3.policies import HAMActorCriticCnnPolicy, HAMActorCriticPolicy, HAMMultiInputActorCriticPolicy
from ham_rl.agents.sb3.ppo import CnnHamPolicy, HAMRecurrentPPO, MlpHamPolicy, MultiInputHamPolicy

__all__ = [
    "CnnHamPolicy",
    "HAMActorCriticCnnPolicy",
    "HAMActorCriticPolicy",
    "HAMDictRolloutBuffer",
    "HAMMultiInputActorCriticPolicy",
    "HAMRecurrentPPO",
    "HAMRolloutBuffer",
    "MlpHamPolicy",
    "MultiInputHamPolicy",
]
