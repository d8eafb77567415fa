"""The fused HAM rollout step for B envs: ``ham_step`` dispatches to Triton or the reference."""

from kernels.ham_step.reference import choose_slot, surprise_score
from kernels.ham_step.reference import ham_step as reference_ham_step

__all__ = ["ham_step", "reference_ham_step", "choose_slot", "surprise_score"]

ham_step = reference_ham_step
