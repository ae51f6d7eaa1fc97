"""DAPO algorithm pieces, pure torch/numpy and free of distributed state.

* :mod:`.overlong` - overlong reward shaping and truncation filtering;
* :mod:`.dynamic_sampling` - the buffer that keeps only informative prompt
  groups and hands out exact training batches;
* :mod:`.advantage` - GRPO group-relative advantages;
* :mod:`.loss` - the decoupled/dual-clip policy loss and its exact global
  aggregation across micro-batches and data-parallel ranks.

Keeping them free of ``torch.distributed`` lets every formula be unit-tested
on a CPU; the actor supplies the all-reduced normalisers.
"""
