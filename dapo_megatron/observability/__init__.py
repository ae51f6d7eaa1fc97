"""What a run reports: step metrics under verl's names, where they are logged, and plots of them.

The logger backends are named here, free of torch and numpy, so the schema
(:mod:`dapo_megatron.config`) checks ``trainer.logger`` against the tuple
:class:`~dapo_megatron.observability.tracking.MetricsLogger` uses without importing it.
"""

# trainer.logger: every backend MetricsLogger can write to
LOGGERS: tuple[str, ...] = ("console", "jsonl", "tensorboard", "wandb")
