"""Ops under the memories: one folder per op, each with ``reference.py`` (pure PyTorch, the truth and the CPU path)."""

__all__: list[str] = []
