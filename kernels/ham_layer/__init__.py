"""The HAM layer's per-token work around its two paths in the sequence form: ``tokens`` (input projections to unit q
and k, v, the gates and the attention's query) and ``readout`` (the gated paths through RMSNorm). ``reference`` holds
the PyTorch form, ``cpu_layer`` the native calls that ``HybridMemory`` runs for its own layout on float32 CPU tensors
(every other case runs the memory's own PyTorch ops, the same functions); ``cpu_sequence`` the whole layer, input to
output, as one autograd node whose forward and backward are one native call each, which ``HybridMemory`` runs for
that layout where its inputs are finite and its carried-in state needs no gradient."""

from __future__ import annotations

from ham_rl.kernels.ham_layer import cpu_layer, cpu_sequence, reference

__all__ = ["cpu_layer", "cpu_sequence", "reference"]
