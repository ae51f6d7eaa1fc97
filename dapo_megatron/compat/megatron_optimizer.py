"""Patches of megatron-core's ``DistributedOptimizer`` that apply on every device.

Each is applied as a context manager around the one call that needs it and restored on exit,
so megatron's class is patched only while our own code is inside that call.  Each is guarded
by :func:`dapo_megatron.compat.guard` (ranges, tests and root causes: :data:`dapo_megatron.compat.PATCHES`,
docs/COMPAT.md).

``fully_reshardable`` optimizer state with more than one DDP bucket (megatron-core 0.16.1)
    ``DistributedOptimizer.get_parameter_state_dp_zero`` concatenates the buckets' gathered
    state *without* the padding between buckets, but ``sharded_param_state_fully_reshardable``
    slices that tensor with ``buffer.param_index_map``, whose offsets count the padding.  With
    one bucket the two agree; with several, every parameter after the first bucket is saved
    with another parameter's main weights and Adam moments, and a resume writes them into the
    model (measured: weights 105 % off after one resumed update).  The fix hands the method
    index maps in the unpadded coordinates of the tensor it slices, for the duration of the
    call.  The load side is not affected (it maps by parameter), but its shape-only pass slices
    the same way, so the fix wraps it too (it otherwise warns about "data corruption" padding).
    Refused outside 0.16.1: index maps handed to code of another layout could scramble state
    silently, and a single bucket avoids the bug.

``KeyError: 'step'`` loading ``fully_reshardable`` state into torch's Adam (0.16.1, 0.19.2)
    ``load_parameter_state_from_fully_reshardable`` deliberately leaves ``step`` out of the
    tensors it hands over (the step count travels in the param groups and
    ``DistributedOptimizer.load_state_dict`` has already put it into the state), but
    ``_set_main_param_and_optimizer_states`` copies *every key of the destination* state from
    that dict.  Apex/TE FusedAdam keep ``step`` in the param group, so their per-parameter
    state has no ``step`` and megatron's own runs never hit this; ``torch.optim.Adam`` (the
    CPU stack, or a GPU install without Apex/TE) keeps a per-parameter ``step`` tensor, hence
    the KeyError.  Warned, not refused, outside the range: the wrapper only supplies a missing
    ``step`` from the destination itself (a no-op copy), so on a fixed release it does nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from dapo_megatron.compat import guard

__all__ = ["adam_step_passthrough", "fully_reshardable_bucket_fix", "needs_bucket_fix", "unpadded_index_map"]


def unpadded_index_map(buffer: Any) -> dict:
    """``buffer.param_index_map`` with offsets that skip the padding between buckets."""
    before, running = [], 0
    for bucket in buffer.buckets:
        before.append(running)
        running += bucket.numel_unpadded
    out = {}
    for param, (start, end, bucket_id) in buffer.param_index_map.items():
        shift = buffer.buckets[bucket_id].offset - before[bucket_id]
        out[param] = (start - shift, end - shift, bucket_id)
    return out


def needs_bucket_fix(optimizer: Any) -> bool:
    """Whether any distributed optimizer under ``optimizer`` has a buffer of several buckets."""
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        for buffer in getattr(opt, "buffers", None) or []:
            if len(buffer.buckets) > 1:
                return True
    return False


@contextlib.contextmanager
def fully_reshardable_bucket_fix(optimizer: Any) -> Iterator[None]:
    """Around ``optimizer.sharded_state_dict(...)`` with ``fully_reshardable`` state.

    Raises:
        UnverifiedVersionError: several buckets on a megatron-core the fix was not measured on.
    """
    if not needs_bucket_fix(optimizer):
        yield
        return
    guard("fully-reshardable-buckets")
    original = DistributedOptimizer.sharded_param_state_fully_reshardable

    def patched(self, *args, **kwargs):
        saved = [buffer.param_index_map for buffer in self.buffers]
        for buffer in self.buffers:
            buffer.param_index_map = unpadded_index_map(buffer)
        try:
            return original(self, *args, **kwargs)
        finally:
            for buffer, index_map in zip(self.buffers, saved, strict=True):
                buffer.param_index_map = index_map

    DistributedOptimizer.sharded_param_state_fully_reshardable = patched
    try:
        yield
    finally:
        DistributedOptimizer.sharded_param_state_fully_reshardable = original


@contextlib.contextmanager
def adam_step_passthrough() -> Iterator[None]:
    """Around ``optimizer.load_state_dict(...)``: a missing ``step`` is taken from the destination.

    That keeps the value ``load_state_dict`` set from the param groups, which is what megatron
    intends.  Only the plain (not precision-aware) branch copies destination keys, so only it
    is touched.
    """
    guard("adam-step-passthrough")
    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if torch.is_tensor(step):
                tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original
