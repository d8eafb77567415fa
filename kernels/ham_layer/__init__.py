"""The HAM layer's per-token work around its two paths in the sequence form: ``tokens`` (input projections to unit q
and k, v, the gates and the attention's query) and ``readout`` (the gated paths through RMSNorm). ``reference`` holds
the PyTorch form, ``cpu_layer`` the native calls that ``HybridMemory`` runs for its own layout on float32 CPU tensors
(every other case runs the memory's own PyTorch ops, the same functions)."""

from __future__ import annotations

from ham_rl.kernels.ham_layer import cpu_layer, reference

__all__ = ["cpu_layer", "reference"]
