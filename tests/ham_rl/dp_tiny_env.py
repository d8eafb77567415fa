"""Registers tests/agents/tiny_env's RecallFirst on import, for ``env.id=dp_tiny_env:ham_rl_test/RecallFirst-v0``."""

from tiny_env import register_tiny_env

register_tiny_env()
