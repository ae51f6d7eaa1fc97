"""Resume the actor's model + distributed-optimizer + schedule state at another TP/PP/DP layout.

Usage (two separate launches, as after a job was killed and restarted)::

    torchrun --nproc_per_node=2 ckpt_reshard_worker.py save   --hf-dir HF --root DIR --layout 2x1
    torchrun --nproc_per_node=2 ckpt_reshard_worker.py resume --hf-dir HF --root DIR --layouts 1x2,1x1

``save``: a :class:`MegatronActor` at the saved layout (TPxPP) takes one update (3 Adam steps,
LR warm-up active, clipping) and saves model + optimizer (``fully_reshardable``) + the update
count to ``DIR/new``, and the same in the legacy ``dp_reshardable`` format to ``DIR/legacy``.
It then takes the second update uninterrupted and writes its weights to ``DIR/ref_saved_layout.pt``
(the cross-layout noise floor).

``resume``, for each layout: (1) an uninterrupted run takes both updates at that layout;
(2) a fresh actor loads ``DIR/new`` and takes the second update: loss, grad norm and every
weight must match (1); (3) the same with the loaded Adam moments zeroed must *not* match, so
the comparison can fail; (4) loading ``DIR/legacy`` at a layout other than the saved one is
refused with a message naming the format.  Rank 0 prints one ``RESHARD-OK`` line per layout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from actor_update_worker import actor_cfg, dp_share, make_batch

# Relative to the largest weight: the runs being compared took their first update at
# different layouts, so fp32 reduction order differs (measured: ~1e-7 relative).
WEIGHT_RTOL = 1e-5
METRIC_RTOL = 1e-5
CONTROL_FACTOR = 10  # the zeroed-moments control must miss by at least this x tolerance
GROUPS_PER_STEP = 2  # prompt groups per optimizer step (actor_cfg's ppo_mini_batch_size)


def parse_layout(spec: str) -> tuple[int, int]:
    tp, pp = (int(x) for x in spec.split("x"))
    return tp, pp


def build_actor(hf_dir: str, hf_config, tp: int, pp: int):
    from dapo_megatron.actor.actor import MegatronActor
    from dapo_megatron.config import AlgorithmConfig

    cfg = actor_cfg(tp, pp, False, 40, dist_opt=True)
    cfg.optim.lr_warmup_steps = 2  # lr differs between update 0 and 1: the schedule position matters
    return MegatronActor(cfg, AlgorithmConfig(), hf_config, weights=hf_dir, temperature=0.7)


def batches(vocab: int):
    """This DP rank's share of the two updates' batches (same global batches at every layout)."""
    return [dp_share(make_batch(vocab, seed=seed), GROUPS_PER_STEP)[0] for seed in (7, 8)]


def update(actor, batch) -> dict[str, float]:
    m = actor.update(batch)
    assert m["actor/nonfinite_skips"] == 0, m
    return {"pg_loss": m["actor/pg_loss"], "grad_norm": m["actor/grad_norm"], "lr": m["actor/lr"]}


def all_weights(actor, hf_config) -> dict[str, torch.Tensor]:
    """Every HF-named weight of the whole model on every rank (PP stages merged)."""
    from dapo_megatron.actor.hf_loading import iter_hf_weights

    mine = {k: v.detach().clone() for k, v in iter_hf_weights(actor.model, hf_config)}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    scale = max(t.abs().max().item() for t in b.values())
    return max((a[k] - b[k]).abs().max().item() for k in b) / scale


def metric_diff(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in ("pg_loss", "grad_norm"))


def zero_adam_moments(optimizer) -> None:
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        for state in opt.optimizer.state.values():
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()


def save_phase(args, hf_config) -> None:
    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel
    from dapo_megatron.checkpoint.training import save_checkpoint

    tp, pp = parse_layout(args.layout)
    init_parallel(tp, pp, seed=1)
    actor = build_actor(args.hf_dir, hf_config, tp, pp)
    first, second = batches(hf_config.vocab_size)
    update(actor, first)
    root = Path(args.root)
    for name, sharding in (("new", "fully_reshardable"), ("legacy", "dp_reshardable")):
        save_checkpoint(
            root / name,
            1,
            actor.model,
            hf_config,
            optimizer=actor.optimizer,
            extra_state={"actor_update_count": actor.update_count},
            optimizer_sharding=sharding,
        )
    m = update(actor, second)
    weights = all_weights(actor, hf_config)
    if dist.get_rank() == 0:
        torch.save({"metrics": m, "weights": weights}, root / "ref_saved_layout.pt")
        from megatron.core import __version__ as mcore_version

        print(f"RESHARD-SAVED tp={tp} pp={pp} megatron-core={mcore_version}", flush=True)
    destroy_parallel(destroy_process_group=False)


def resume_layout(args, hf_config, tp: int, pp: int, saved_ref: dict) -> str:
    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel
    from dapo_megatron.checkpoint.metadata import read_checkpoint_metadata
    from dapo_megatron.checkpoint.training import load_checkpoint

    root = Path(args.root)
    init_parallel(tp, pp, seed=1)
    try:
        first, second = batches(hf_config.vocab_size)
        # (1) uninterrupted at this layout
        ref = build_actor(args.hf_dir, hf_config, tp, pp)
        init = all_weights(ref, hf_config)
        update(ref, first)
        m_ref = update(ref, second)
        w_ref = all_weights(ref, hf_config)
        del ref

        def resumed(zero_moments: bool):
            actor = build_actor(args.hf_dir, hf_config, tp, pp)
            extra = load_checkpoint(root / "new", actor.model, hf_config, optimizer=actor.optimizer)
            actor.update_count = extra["actor_update_count"]
            if zero_moments:
                zero_adam_moments(actor.optimizer)
            return update(actor, second), all_weights(actor, hf_config)

        # (2) resumed from the checkpoint of the other layout
        m_res, w_res = resumed(zero_moments=False)
        d_w, d_m = rel_diff(w_res, w_ref), metric_diff(m_res, m_ref)
        moved = rel_diff(w_ref, init)
        d_floor = rel_diff(saved_ref["weights"], w_ref)
        assert m_res["lr"] == m_ref["lr"], (m_res, m_ref)
        assert moved > CONTROL_FACTOR * WEIGHT_RTOL, moved  # the two updates really moved the weights
        assert d_w < WEIGHT_RTOL and d_m < METRIC_RTOL, (d_w, d_m, m_res, m_ref)

        # (3) control: the same resume with the Adam moments lost
        m_ctl, w_ctl = resumed(zero_moments=True)
        d_ctl = rel_diff(w_ctl, w_ref)
        assert d_ctl > CONTROL_FACTOR * WEIGHT_RTOL, d_ctl

        # (4) legacy dp_reshardable state is bound to the saved layout
        saved = read_checkpoint_metadata(root / "legacy")["saved_layout"]
        if (saved["tp"], saved["pp"]) != (tp, pp):
            actor = build_actor(args.hf_dir, hf_config, tp, pp)
            try:
                load_checkpoint(root / "legacy", actor.model, hf_config, optimizer=actor.optimizer)
            except ValueError as e:
                assert "'dp_reshardable'" in str(e) and f"now tp={tp} pp={pp}" in str(e), e
            else:
                raise AssertionError("legacy dp_reshardable optimizer state loaded at another layout")
        return (
            f"RESHARD-OK saved tp={saved['tp']} pp={saved['pp']} -> tp={tp} pp={pp} "
            f"dp={dist.get_world_size() // (tp * pp)} "
            f"rel_weights={d_w:.2e} rel_loss_gradnorm={d_m:.2e} noise_floor_vs_saved_layout_run={d_floor:.2e} "
            f"moved={moved:.2e} zeroed_moments_control={d_ctl:.2e} "
            f"loss={m_res['pg_loss']:.6f} grad_norm={m_res['grad_norm']:.6f} ctl_grad_norm={m_ctl['grad_norm']:.6f}"
        )
    finally:
        destroy_parallel(destroy_process_group=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=("save", "resume"))
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--layout", default="2x1", help="save: TPxPP")
    ap.add_argument("--layouts", default="1x2,1x1", help="resume: comma-separated TPxPP")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(args.hf_dir)
    if args.phase == "save":
        save_phase(args, hf_config)
    else:
        saved_ref = torch.load(Path(args.root) / "ref_saved_layout.pt", weights_only=True)
        for spec in args.layouts.split(","):
            line = resume_layout(args, hf_config, *parse_layout(spec), saved_ref)
            if dist.get_rank() == 0:
                print(line, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
