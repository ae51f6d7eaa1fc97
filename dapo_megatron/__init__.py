"""DAPO reinforcement learning on Megatron-core.

The package layout follows the data flow of one training step:
data -> rollout -> reward -> algo (overlong, dynamic sampling, advantage,
loss) -> actor update -> weight_sync.
"""

__version__ = "0.1.0"
