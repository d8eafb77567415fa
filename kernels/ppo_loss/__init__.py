"""PPO's clipped loss: ``reference`` (the PyTorch ops, the truth) and ``cpu_loss`` (one native call on CPU tensors)."""

from __future__ import annotations

from torch import Tensor

from ham_rl.kernels.ppo_loss import cpu_loss, reference

__all__ = ["cpu_loss", "ppo_loss", "reference"]


def ppo_loss(
    newlogprob: Tensor,
    entropy: Tensor,
    newvalue: Tensor,
    logprob: Tensor,
    advantages: Tensor,
    returns: Tensor,
    values: Tensor,
    clip_coef: float,
    ent_coef: float,
    vf_coef: float,
    norm_adv: bool,
    clip_vloss: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``reference.ppo_loss`` (arguments and returns): the native call for float32 CPU tensors where the kernels are
    chosen and built (``kernels/native.py``), the reference's ops otherwise."""
    args = (newlogprob, entropy, newvalue, logprob, advantages, returns, values)
    loss = cpu_loss.cpu_ppo_loss if cpu_loss.fits(*args) else reference.ppo_loss
    return loss(*args, clip_coef, ent_coef, vf_coef, norm_adv, clip_vloss)
