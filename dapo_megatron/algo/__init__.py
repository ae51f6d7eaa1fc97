"""DAPO algorithm pieces, pure torch/numpy and free of distributed state.

* :mod:`.overlong` - overlong reward shaping;
* :mod:`.dynamic_sampling` - the buffer that keeps only informative prompt
  groups and hands out exact training batches;
* :mod:`.advantage` - GRPO group-relative advantages;
* :mod:`.loss` - the decoupled/dual-clip policy loss and its exact global
  aggregation across micro-batches and data-parallel ranks.

Keeping them free of ``torch.distributed`` lets every formula be unit-tested
on a CPU; the actor supplies the all-reduced normalisers.

The choices the config offers for these pieces are defined here, free of torch and numpy,
so the schema (:mod:`dapo_megatron.config`) checks a value against the very tuple the
module acting on it uses.
"""

# algorithm.adv_estimator: :mod:`.advantage`
ADV_ESTIMATORS: tuple[str, ...] = ("grpo",)
# algorithm.loss_agg_mode (verl's names): :func:`.loss.aggregate_loss`
LOSS_AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
# algorithm.filter_groups.metric: the per-response value whose spread makes a group informative
# (:class:`.dynamic_sampling.DynamicSamplingBuffer`)
FILTER_METRICS: tuple[str, ...] = ("acc", "score", "seq_reward")
# algorithm.filter_groups.on_exhausted: what the buffer does when max_num_gen_batches rounds
# did not fill the batch
ON_EXHAUSTED: tuple[str, ...] = ("raise", "train_partial")
