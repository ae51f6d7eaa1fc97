"""The Megatron actor: model, optimizer, micro-batching, log-probs, offload and checkpoints.

The choices the config offers for the actor are defined here, beside the modules that act on
them and free of torch, so the schema (:mod:`dapo_megatron.config`) checks a value against the
very tuple the actor uses without importing torch or megatron.
"""

# actor.optim.lr_decay_style: the schedules of :func:`dapo_megatron.actor.optimizer.lr_at_step`
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")
# actor.recompute: :func:`dapo_megatron.actor.actor._recompute_overrides` (megatron's
# recompute_granularity); the planner models each one's activation memory
RECOMPUTE: tuple[str, ...] = ("none", "full", "selective")
# actor.transformer_impl: Megatron-LM's --transformer-impl (:func:`dapo_megatron.actor.model.resolve_transformer_impl`)
TRANSFORMER_IMPLS: tuple[str, ...] = ("transformer_engine", "local")
