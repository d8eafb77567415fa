"""HAM as the memory of sb3-contrib's RecurrentPPO: ``from ham_rl.sb3 import HAMRecurrentPPO``.

See docs/sb3.md. The code lives in :mod:`ham_rl.agents.sb3`; this module re-exports it.
"""

from ham_rl.agents.sb3 import (
    CnnHamPolicy,
    HAMActorCriticCnnPolicy,
    HAMActorCriticPolicy,
    HAMDictRolloutBuffer,
    HAMMultiInputActorCriticPolicy,
    HAMRecurrentPPO,
    HAMRolloutBuffer,
    MlpHamPolicy,
    MultiInputHamPolicy,
)

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
