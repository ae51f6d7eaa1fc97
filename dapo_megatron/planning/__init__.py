"""Preflight planning: per-GPU memory per phase and cost per step of a config on a cluster,
from the config and the model's ``config.json`` alone (no torch, no weights)."""
