"""The causal short convolution's native CPU form (``cpu_conv``); the truth is ``ham_rl/memory/short_conv.py``."""
