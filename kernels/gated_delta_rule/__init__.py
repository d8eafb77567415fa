"""Gated delta rule with episode resets: ``gated_delta_rule`` dispatches to Triton or the PyTorch reference."""

from kernels.gated_delta_rule.reference import naive_recurrent_gated_delta_rule

__all__ = ["gated_delta_rule", "naive_recurrent_gated_delta_rule"]

# Until the chunked and Triton forms land, every backend runs the reference.
gated_delta_rule = naive_recurrent_gated_delta_rule
