"""The agent's parameters as views of one flat tensor, and their gradients as views of another.

PPO zeroes the gradients, clips their norm and steps Adam once per minibatch. Over the policy's twenty-odd parameter
tensors each of those is Python work per tensor (``torch.optim``'s per-parameter bookkeeping, ``clip_grad_norm_``'s
per-tensor norms), which on a CPU costs more than the arithmetic; over one flat tensor each is one or two ops. The
modules keep their own ``nn.Parameter`` objects (their ``.data`` and ``.grad`` become views), so the agent's
``state_dict``, its forward passes and autograd are as before; the optimizer steps the flat tensor.

Adam is elementwise, so stepping the flat tensor is stepping each parameter, as long as every parameter has a gradient
at every step (a zero one where the loss does not reach it): the case of the PPO loss, which reaches every parameter of
the policy. The clipping norm is the norm of all gradients at once, equal to torch's norm of the per-tensor norms
within float32 round-off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["FlatParameters"]


class FlatParameters:
    """Rebind ``params`` as views of one flat parameter (``.param``, what the optimizer steps) and their gradients as
    views of its gradient (``.grad``).

    :param params: the parameters, all floating point of one dtype and device, all requiring grad
    :raises ValueError: for an empty list, a parameter that does not require grad, or mixed dtypes or devices (the
        message names the first such parameter)
    """

    def __init__(self, params: Sequence[nn.Parameter]):
        params = list(params)
        if not params:
            raise ValueError("FlatParameters needs at least one parameter")
        first = params[0]
        for i, p in enumerate(params):
            if not p.requires_grad:
                raise ValueError(f"parameter {i} does not require grad; only trained parameters can be flattened")
            if p.dtype != first.dtype or p.device != first.device or not p.is_floating_point():
                raise ValueError(
                    f"parameter {i} is {p.dtype} on {p.device}, parameter 0 {first.dtype} on {first.device}; "
                    "flattened parameters share one floating dtype and device"
                )
        self.params = params
        self.shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]
        self.param = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
        self.grad = torch.zeros_like(self.param)
        self.param.grad = self.grad
        for p, view, grad in zip(params, self._views(self.param.data), self._views(self.grad), strict=True):
            p.data = view
            p.grad = grad  # autograd adds into it in place: the flat gradient is the sum without a copy

    def _views(self, flat: Tensor) -> list[Tensor]:
        return [t.view(shape) for t, shape in zip(flat.split(self.sizes), self.shapes, strict=True)]

    def check_bound(self) -> None:
        """Raise ``RuntimeError`` where a parameter's data or gradient is no longer its view (for example after
        ``agent.to(...)`` or an assignment to ``.grad``): the optimizer would step a copy the modules do not read."""
        start, grad_start = self.param.data_ptr(), self.grad.data_ptr()
        offset, size = 0, self.param.element_size()
        for i, p in enumerate(self.params):
            if p.data_ptr() != start + offset * size or p.grad is None or p.grad.data_ptr() != grad_start + offset * size:
                raise RuntimeError(
                    f"parameter {i} ({tuple(p.shape)}) no longer shares the flat parameter's storage; move or change "
                    "the agent before building PPO, not after"
                )
            offset += p.numel()

    def zero_grad(self) -> None:
        """Zero every gradient (one fill)."""
        self.grad.zero_()

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Scale the gradients so that their joint 2-norm is at most ``max_norm``; returns the norm before scaling
        (``nn.utils.clip_grad_norm_``'s rule and its 1e-6)."""
        total = torch.linalg.vector_norm(self.grad)
        self.grad.mul_(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return total

    # ---- the optimizer's state, in the layout of an optimizer over the separate parameters ----------------------
    def per_parameter_state(self, flat_state: dict) -> dict:
        """``optimizer.state_dict()`` of the flat parameter as an optimizer over the separate parameters would write
        it (parameter ``i`` the i-th of ``params``): checkpoints keep one layout whichever way the run stepped."""
        state, per = flat_state["state"].get(0), {}
        if state is not None:  # none before the first step
            views = {k: self._views(v) for k, v in state.items() if v.dim() > 0}  # the step count is shared, 0-dim
            for i in range(len(self.params)):
                per[i] = {k: (views[k][i] if k in views else v).clone() for k, v in state.items()}
        groups = [{**flat_state["param_groups"][0], "params": list(range(len(self.params)))}]
        return {"state": per, "param_groups": groups}

    def flat_state(self, per_state: dict) -> dict:
        """The inverse of :meth:`per_parameter_state`.

        :raises ValueError: where the state does not cover these parameters, or holds unequal step counts (an
            optimizer that skipped some parameter at some step, which the flat one cannot continue exactly)
        """
        groups = per_state["param_groups"]
        ids = [i for g in groups for i in g["params"]]
        if len(groups) != 1 or ids != list(range(len(self.params))):
            raise ValueError(
                f"the optimizer state holds parameter groups {[len(g['params']) for g in groups]}; expected one group "
                f"of the {len(self.params)} parameters"
            )
        states = per_state["state"]
        flat = {}
        if states:
            if sorted(states) != ids:
                raise ValueError(f"the optimizer state covers {len(states)} of {len(self.params)} parameters")
            first = states[0]
            for k, v in first.items():
                if v.dim() == 0:
                    if any(not torch.equal(states[i][k], v) for i in ids):
                        raise ValueError(f"the optimizer state's {k!r} differs between parameters")
                    flat[k] = v.clone()
                else:
                    flat[k] = torch.cat([states[i][k].reshape(-1) for i in ids])
        return {"state": {0: flat} if flat else {}, "param_groups": [{**groups[0], "params": [0]}]}
