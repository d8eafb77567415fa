"""The actor-critic heads' rollout step (two Tanh MLPs and categorical sampling) as one native call: ``cpu_heads``."""
