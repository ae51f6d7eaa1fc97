"""The collective helpers (dapo_megatron/distributed.py) and their callers, under torchrun (gloo).

Usage::

    torchrun --nproc_per_node=2 collectives_worker.py OUTPUT_DIR

Every rank joins through ``init_parallel`` (the package's own process-group set-up), then checks:

1. the default group's backend configuration is the policy's (gloo here), and megatron's data-parallel
   group inherits it;
2. ``any_true``, ``all_sum`` and ``all_max`` over the world, over megatron's DP group and over a
   one-rank subgroup (which must see only its own value);
3. the trainer's ``_stop_agreed`` (a signal on rank 1 only stops every rank; rank 0 records -1),
   ``_pool_metrics`` (counters summed over ranks) and ``_require_finite_policy`` (a NaN on rank 1
   only makes every rank raise), and the rollout-correction metrics: each rank holds a different
   shard, and every rank gets the whole batch's values;
4. checkpointing's ``rank0_phase``: a failure on rank 0 raises on every rank (rank 0 its own error),
   success returns rank 0's result.
Rank 0 prints ``CHECK ...`` lines; any failure raises.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(f"rank {dist.get_rank()}: {what}")
    if dist.get_rank() == 0:
        print(f"CHECK {what}", flush=True)


def main() -> None:
    from megatron.core import parallel_state as ps

    from dapo_megatron.actor.actor import NonFinitePolicyError
    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel
    from dapo_megatron.algo.rollout_correction import (
        rollout_corr_metrics,
        rollout_corr_metrics_over_ranks,
        rollout_corr_partials,
    )
    from dapo_megatron.checkpoint.agreement import rank0_phase
    from dapo_megatron.config import DapoConfig
    from dapo_megatron.distributed import all_max, all_sum, any_true, default_backend
    from dapo_megatron.trainer import DapoTrainer
    from tests.fakes import fake_parts

    out_dir = sys.argv[1]
    init_parallel(1, 1, seed=0)
    rank, world = dist.get_rank(), dist.get_world_size()
    check(default_backend(torch.cuda.is_available()) == "gloo", "policy backend on CPU is gloo")
    check(dist.get_backend_config() == "cpu:gloo,cuda:gloo", "default group uses the policy backend")
    dp = ps.get_data_parallel_group()
    check(dist.get_backend_config(dp) == dist.get_backend_config(), "megatron's DP group inherits the backend")

    for label, group, size in (("world", None, world), ("dp", dp, world)):
        check(any_true(rank == 1, group=group), f"{label}: any_true sees rank 1's True")
        check(not any_true(False, group=group), f"{label}: any_true of all False is False")
        ranks = sum(range(size))
        check(all_sum([rank, 0.5], group=group) == [float(ranks), 0.5 * size], f"{label}: all_sum")
        check(all_max([rank, -rank], group=group) == [float(size - 1), 0.0], f"{label}: all_max")
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    mine = singles[rank]
    check(all_sum([rank + 1], group=mine) == [float(rank + 1)], "one-rank group: all_sum is local")
    check(any_true(rank == 1, group=mine) is (rank == 1), "one-rank group: any_true is local")

    cfg = DapoConfig()
    cfg.trainer.output_dir = out_dir
    trainer = DapoTrainer(cfg, fake_parts(cfg))
    trainer.step = 1
    trainer._stop_signal = 10 if rank == 1 else None
    check(trainer._stop_agreed(), "trainer: a signal on rank 1 stops every rank")
    check(trainer._stop_signal == (10 if rank == 1 else -1), "trainer: other ranks record the agreed stop as -1")

    class Pool:
        def metrics(self) -> dict[str, float]:
            return {"reward/num_scored": 3.0 + rank, "reward/seconds": 0.25}

    trainer.parts.pool = Pool()
    pooled = trainer._pool_metrics()
    check(
        pooled == {"reward/num_scored": 3.0 * world + sum(range(world)), "reward/seconds": 0.25 * world},
        "trainer: pool metrics are summed over ranks",
    )
    mask = torch.ones(2, 3, dtype=torch.bool)
    trainer._require_finite_policy(torch.zeros(2, 3), mask)
    bad = torch.zeros(2, 3)
    if rank == 1:
        bad[1, 2] = float("nan")
    try:
        trainer._require_finite_policy(bad, mask)
    except NonFinitePolicyError:
        raised = True
    else:
        raised = False
    check(raised, "trainer: a non-finite log-prob on rank 1 stops every rank")

    g = torch.Generator().manual_seed(0)  # every rank builds the same batch, then takes its rows
    old = -torch.rand(5, 4, generator=g, dtype=torch.float64) * 2
    rollout = old + 0.5 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    lengths = torch.tensor([4, 1, 3, 2, 4])
    valid = torch.arange(4) < lengths.unsqueeze(-1)
    rows = slice(0, 2) if rank == 0 else slice(2, 5)  # shards of different sizes
    whole = rollout_corr_metrics(*rollout_corr_partials(old, rollout, valid, cap=1.5), cap=1.5)
    got = rollout_corr_metrics_over_ranks(old[rows], rollout[rows], valid[rows], cap=1.5)
    close = got.keys() == whole.keys() and all(abs(got[k] - whole[k]) <= 1e-12 * max(1.0, abs(whole[k])) for k in got)
    check(close, "trainer: rollout-correction metrics cover every rank's shard")

    def fail() -> None:
        raise OSError("disk full")

    try:
        rank0_phase(fail, "test")
    except OSError as e:
        outcome = f"own:{e}"
    except RuntimeError as e:
        outcome = f"reported:{e}"
    else:
        outcome = "none"
    expected = "own:disk full" if rank == 0 else "reported:checkpoint test failed on rank 0 (see its error)"
    check(outcome == expected, "checkpoint: rank 0's failure raises on every rank")
    check(rank0_phase(lambda: "ok", "test") == ("ok" if rank == 0 else None), "checkpoint: success passes")
    destroy_parallel()


if __name__ == "__main__":
    main()
