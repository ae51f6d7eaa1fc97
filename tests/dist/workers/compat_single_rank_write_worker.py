"""A write only rank 0 does fails inside megatron's ``dist_checkpointing.save`` (2 ranks, gloo).

    torchrun --nproc_per_node=2 compat_single_rank_write_worker.py ROOT TIMEOUT_S

Rank 0's ``common.pt`` cannot be written (a directory of that name is in the way: a real
``IsADirectoryError`` from megatron's own ``torch.save``, the shape of a full disk).  First with
:func:`dapo_megatron.compat.megatron_checkpoint.single_rank_writes_deferred` around the save: both
ranks return from it and rank 0 holds the error.  Then unpatched (last: it leaves the process
group unusable): rank 0 raises alone and rank 1 waits in megatron's next collective until the
group's timeout, without ever seeing rank 0's error, which is the bug the patch exists for.
The ranks report through files, not collectives; rank 0 prints
``DEFERRED patched=<errors on rank 0>/<errors on rank 1> rank0=<exc> rank1=<exc> waited=<s>``.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dapo_megatron.compat.megatron_checkpoint import apply_writer_cpu_shim, single_rank_writes_deferred
from dapo_megatron.compat.megatron_cpu import apply_cpu_shims


def sharded_state(rank: int, world: int) -> dict:
    from megatron.core.dist_checkpointing import ShardedTensor

    tensor = torch.full((4,), float(rank))
    return {"w": ShardedTensor.from_rank_offsets("w", tensor, (0, rank, world)), "note": "common state"}


def blocked_dir(root: Path, label: str) -> Path:
    """A checkpoint directory whose ``common.pt`` rank 0 cannot write."""
    directory = root / label
    if dist.get_rank() == 0:
        (directory / "common.pt").mkdir(parents=True)
    return directory


def main(argv: list[str]) -> int:
    from megatron.core import dist_checkpointing

    root, timeout_s = Path(argv[0]), float(argv[1])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    if not torch.cuda.is_available():
        apply_cpu_shims()
        apply_writer_cpu_shim()
    rank, world = dist.get_rank(), dist.get_world_size()

    patched = blocked_dir(root, "patched")
    dist.barrier()
    errors: list[BaseException] = []
    with single_rank_writes_deferred(errors):
        dist_checkpointing.save(sharded_state(rank, world), str(patched))
    counts = [0] * world
    dist.all_gather_object(counts, len(errors))

    unpatched = blocked_dir(root, "unpatched")
    dist.barrier()
    start = time.monotonic()
    try:
        dist_checkpointing.save(sharded_state(rank, world), str(unpatched))
        outcome = "returned"
    except BaseException as exc:  # noqa: BLE001 -- the outcome is the report
        outcome = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    report = {"outcome": outcome, "seconds": round(time.monotonic() - start, 1)}
    # Written whole, then renamed: rank 0 polls for the file and must never read it half-written.
    (root / f"rank{rank}.json.tmp").write_text(json.dumps(report))
    (root / f"rank{rank}.json.tmp").rename(root / f"rank{rank}.json")
    if rank == 0:
        other = root / "rank1.json"
        deadline = time.monotonic() + timeout_s + 120
        while not other.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        rank1 = json.loads(other.read_text()) if other.exists() else {"outcome": "still waiting", "seconds": -1}
        print(
            f"DEFERRED patched={counts[0]}/{counts[1]} rank0={report['outcome']!r} "
            f"rank1={rank1['outcome']!r} waited={rank1['seconds']}",
            flush=True,
        )
    # the group is unusable after the unpatched save: leave without its collectives
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
