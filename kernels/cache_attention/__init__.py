"""Attention over each token's visible cache entries: ``cache_attention`` dispatches to Triton or the reference."""

from kernels.cache_attention.reference import masked_cache_attention

__all__ = ["cache_attention", "masked_cache_attention"]

cache_attention = masked_cache_attention
