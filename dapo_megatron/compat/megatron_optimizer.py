"""Fixes for megatron-core bugs that apply on every device (the CPU-only shims live in megatron_cpu.py).

Each fix is applied only for the megatron-core versions it was verified on
(:data:`VERIFIED_VERSIONS`), as a context manager around the one call that needs it, and has
a test that runs the unpatched code and shows the bug is still there
(tests/dist/test_ddp_buckets.py).  With another version the caller refuses the configuration
that would hit the bug instead of running it unpatched.

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
"""

from __future__ import annotations

import contextlib

__all__ = ["VERIFIED_VERSIONS", "fully_reshardable_bucket_fix", "needs_bucket_fix", "unpadded_index_map"]

VERIFIED_VERSIONS = ("0.16.1",)


def megatron_version() -> str:
    from megatron.core import __version__

    return __version__


def unpadded_index_map(buffer) -> dict:
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


def needs_bucket_fix(optimizer) -> bool:
    """Whether any distributed optimizer under ``optimizer`` has a buffer of several buckets."""
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        for buffer in getattr(opt, "buffers", None) or []:
            if len(buffer.buckets) > 1:
                return True
    return False


@contextlib.contextmanager
def fully_reshardable_bucket_fix(optimizer):
    """Around ``optimizer.sharded_state_dict(...)`` with ``fully_reshardable`` state."""
    if not needs_bucket_fix(optimizer):
        yield
        return
    version = megatron_version()
    if version not in VERIFIED_VERSIONS:
        raise RuntimeError(
            f"megatron-core {version}: the fix for fully_reshardable optimizer state with several DDP "
            f"buckets is verified only on {', '.join(VERIFIED_VERSIONS)}; run tests/dist/test_ddp_buckets.py "
            "against this version, or use one bucket (actor.ddp.overlap_grad_reduce=false)"
        )
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

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
