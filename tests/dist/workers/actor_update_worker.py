"""MegatronActor checks against a plain HF-transformers oracle, in one 2-rank launch.

Usage::

    torchrun --nproc_per_node=2 actor_update_worker.py HF_DIR [TIED_HF_DIR]
    torchrun --nproc_per_node=4 actor_update_worker.py --layouts-only 2x1,1x2,2x2 HF_DIR [TIED_HF_DIR]

The oracle is the HF model in fp32 on the WHOLE batch in one piece (i.e. DP=1, one
micro-batch, the loss straight from ``policy_loss`` without external normalisers).  Checks
(the last rank prints ``ACTOR-OK <check> ...`` per passed check):

* ``grad``: at TP1 x DP2 the DDP-reduced gradient of one mini-batch equals the oracle's, for
  every ``loss_agg_mode`` (entropy bonus on), with a large token budget (1 micro-batch per rank)
  and a small one (4+ micro-batches, uneven counts equalised across ranks). Every check runs
  with overlapped gradient reduction in many small buckets (``actor.ddp``).
* ``layout``: TP1xDP2, TP2, TP2+SP and PP2 give the oracle's log-probs / entropy (temperature
  0.7), the same loss and grad norm on the first mini-batch, and the same weights after 3
  optimizer steps (distributed optimizer, clipping active); with TIED_HF_DIR also TP1xDP2 vs PP2
  for a model with tied embeddings (first/last-stage embedding gradients are all-reduced).
* ``uneven``: DP ranks with 1 and 5 rows score them correctly; the short rank runs dummy
  micro-batches so both run the same number.
* ``onpolicy``: an update without old log-probs (on-policy) takes the same step as one given
  the log-probs of a separate forward, and is refused when it would take two optimizer steps.
* ``nonfinite``: a NaN advantage skips the step (weights unchanged, metric counted), a finite
  update resets the count, and ``max_consecutive_nonfinite`` NaN steps in a row raise.
"""

from __future__ import annotations

import copy
import dataclasses
import sys

import torch
import torch.distributed as dist

from dapo_megatron.algo.loss import LOSS_AGG_MODES, aggregate_loss, policy_loss
from dapo_megatron.config import ActorConfig, AlgorithmConfig
from dapo_megatron.contract import ActorBatch

GRAD_TOL = 2e-5  # relative to the largest gradient entry
LP_TOL = 1e-4
# Adam divides by sqrt(v): entries whose true gradient is ~0 (e.g. the k-projection bias, to
# which softmax is invariant) turn fp32 reduction-order noise into lr-sized moves, so the
# weights after 3 steps (each move <= lr = 1e-3) agree to ~1e-5, not to 1e-7.
WEIGHT_TOL = 5e-5
GRAD_NORM_RTOL = 2e-5
TEMPERATURE = 0.7
BUCKET = 4096  # DDP bucket size (parameters)
GROUP = 2  # responses per prompt
N_GROUPS = 6
R = 12  # max response length


def make_batch(vocab: int, seed: int = 7) -> ActorBatch:
    g = torch.Generator().manual_seed(seed)
    n = GROUP * N_GROUPS
    prompt_len = torch.randint(2, 9, (n,), generator=g)
    resp_len = torch.randint(1, R + 1, (n,), generator=g)
    resp_len[3] = 0  # an empty response: no tokens, must not count as a sequence in seq-mean
    seq_len = prompt_len + resp_len
    ids = torch.randint(0, vocab, (n, int(seq_len.max()) + 3), generator=g)
    mask = torch.arange(R)[None] < resp_len[:, None]
    mask[5, 0] = False  # a masked-out token in the middle of a response
    old = -torch.rand(n, R, generator=g) * 3 - 2.0
    adv = torch.randn(n, generator=g)
    return ActorBatch(ids, seq_len, prompt_len, mask, old.where(mask, 0.0), adv, group_size=GROUP)


def hf_oracle(hf_model, batch: ActorBatch, mode: str, algo: AlgorithmConfig, entropy_coeff: float):
    """Response log-probs, entropy, loss and HF-named gradients on the whole batch."""
    hf_model.zero_grad(set_to_none=True)
    n = batch.num_sequences
    logits = hf_model(input_ids=batch.input_ids).logits.float() / TEMPERATURE
    logp = torch.log_softmax(logits, dim=-1)
    pos = (batch.prompt_lengths[:, None] - 1 + torch.arange(R)[None]).clamp(max=batch.input_ids.shape[1] - 2)
    lp_all = logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    ent_all = -(logp.exp() * logp).sum(-1)
    lp = lp_all[torch.arange(n)[:, None], pos]
    ent = ent_all[torch.arange(n)[:, None], pos]
    mask = batch.response_mask
    out = policy_loss(
        lp,
        batch.old_log_probs,
        batch.advantages,
        mask,
        clip_ratio_low=algo.clip_ratio_low,
        clip_ratio_high=algo.clip_ratio_high,
        clip_ratio_c=algo.clip_ratio_c,
        loss_agg_mode=mode,
        max_response_length=R,
    )
    loss = out["pg_loss"] - entropy_coeff * aggregate_loss(ent, mask, mode, max_response_length=R)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in hf_model.named_parameters()}
    return lp.detach().where(mask, 0.0), ent.detach().where(mask, 0.0), out["pg_loss"].item(), grads


def actor_cfg(tp: int, pp: int, sp: bool, budget: int, *, dist_opt: bool) -> ActorConfig:
    a = ActorConfig()
    a.parallel.tensor_model_parallel_size = tp
    a.parallel.pipeline_model_parallel_size = pp
    a.parallel.sequence_parallel = sp
    a.params_dtype = "float32"
    a.max_tokens_per_micro_batch = budget
    a.ppo_mini_batch_size = 2  # prompt groups per optimizer step (global)
    a.entropy_coeff = 0.01
    a.optim.lr = 1e-3
    a.optim.lr_warmup_steps = 0
    a.optim.adam_eps = 1e-6
    a.optim.clip_grad = 0.5
    a.optim.use_distributed_optimizer = dist_opt
    a.ddp.bucket_size = BUCKET  # many overlapped buckets (megatron's default makes one for this model)
    return a


def dp_share(batch: ActorBatch, groups_per_step: int) -> ActorBatch:
    """This DP rank's rows: its half of every mini-batch's groups (the trainer's split)."""
    from megatron.core import parallel_state as ps

    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = []
    per_rank = groups_per_step // dp * GROUP
    for start in range(0, batch.num_sequences, groups_per_step * GROUP):
        rows += list(range(start + r * per_rank, start + (r + 1) * per_rank))
    sub = batch.select(rows)
    sub.group_size = GROUP
    return sub, rows


def megatron_grads_as_hf(actor, hf_config) -> dict[str, torch.Tensor]:
    from dapo_megatron.models.mapping import get_mapping

    mapping = get_mapping(hf_config, tp=1)
    out = {}
    for name, p in actor.gpt.named_parameters():
        for hf_name, t in mapping.megatron_full_to_hf(name, p.main_grad.detach().clone()):
            out[hf_name] = t
    return out


def rel_diff(a: dict, b: dict) -> float:
    scale = max(t.abs().max().item() for t in b.values())
    return max((a[k] - b[k]).abs().max().item() for k in b) / scale


def check_grads(hf_dir, hf_model, hf_config, batch) -> list[str]:
    from dapo_megatron.actor.actor import MegatronActor
    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel

    lines = []
    init_parallel(1, 1, seed=1)
    try:
        algo = AlgorithmConfig()
        mini = batch.select(range(0, 2 * GROUP * 2))  # 4 groups = one mini-batch
        mini.group_size = GROUP
        longest = int(mini.seq_lengths.max())  # the smallest legal budget: one row per micro-batch at most
        # (label, token budget or None for a fixed micro_batch_size of 3 sequences)
        for label, budget in (("256", 256), ("small", longest), ("fixed3", None)):
            cfg = actor_cfg(1, 1, False, budget or 256, dist_opt=False)
            cfg.ppo_mini_batch_size = 4
            if budget is None:
                cfg.use_dynamic_bsz, cfg.micro_batch_size = False, 3
            actor = MegatronActor(cfg, algo, hf_config, weights=hf_dir, temperature=TEMPERATURE)
            share, _ = dp_share(mini, 4)
            for mode in LOSS_AGG_MODES:
                actor.algo = dataclasses.replace(algo, loss_agg_mode=mode)
                actor.zero_grad()
                m = actor.forward_backward(share)
                _, _, ref_loss, ref_grads = hf_oracle(hf_model, mini, mode, algo, cfg.entropy_coeff)
                d = rel_diff(megatron_grads_as_hf(actor, hf_config), ref_grads)
                d_loss = abs(m["pg_loss"] - ref_loss)
                buckets = sum(len(b.buckets) for b in actor.model.buffers)
                line = (
                    f"ACTOR-OK grad mode={mode} budget={label} micro_batches={int(m['num_micro_batches'])} "
                    f"buckets={buckets} rel_grad_diff={d:.2e} loss_diff={d_loss:.2e}"
                )
                assert buckets > 1, line
                assert d < GRAD_TOL and d_loss < 1e-6, line
                lines.append(line)
            assert m["num_micro_batches"] == {"256": 1, "small": 4, "fixed3": 2}[label], m
    finally:
        destroy_parallel(destroy_process_group=False)
    return lines


def run_layout(hf_dir, hf_config, batch, tp, pp, sp):
    """Log-probs of the batch, first mini-batch stats, weights after 3 steps (HF names)."""
    from megatron.core import parallel_state as ps

    from dapo_megatron.actor.actor import MegatronActor
    from dapo_megatron.actor.hf_loading import iter_hf_weights
    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel

    init_parallel(tp, pp, seed=1)
    try:
        actor = MegatronActor(
            actor_cfg(tp, pp, sp, 40, dist_opt=True), AlgorithmConfig(), hf_config, weights=hf_dir, temperature=0.7
        )
        share, rows = dp_share(batch, 2)
        lp, ent = actor.compute_log_probs(share)
        first = share.select(range(0, 2 * GROUP // ps.get_data_parallel_world_size()))
        first.group_size = GROUP
        actor.zero_grad()
        m = actor.forward_backward(first)
        m["grad_norm"] = actor.grad_norm()
        actor.zero_grad()
        metrics = actor.update(share)
        assert metrics["actor/nonfinite_skips"] == 0, metrics
        weights = {k: v.clone() for k, v in iter_hf_weights(actor.model, hf_config)}
        # scored again after the steps: covers the last stage's (possibly tied) output layer too
        m["lp_after"], _ = actor.compute_log_probs(share, compute_entropy=False)
        return rows, lp, ent, m, weights
    finally:
        destroy_parallel(destroy_process_group=False)


ALL_LAYOUTS = ((1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False))


def check_layouts(hf_dir, hf_model, hf_config, batch, layouts=ALL_LAYOUTS) -> list[str]:
    ref_lp, ref_ent, _, _ = hf_oracle(hf_model, batch, "token-mean", AlgorithmConfig(), 0.0)
    lines, base = [], None
    tied = int(hf_config.tie_word_embeddings)
    for tp, pp, sp in layouts:
        rows, lp, ent, m, weights = run_layout(hf_dir, hf_config, batch, tp, pp, sp)
        shares = [None] * dist.get_world_size()  # every rank's rows -> the whole batch's log-probs
        dist.all_gather_object(shares, (rows, m["lp_after"]))
        m["lp_after"] = torch.zeros(batch.num_sequences, R)
        for share_rows, share_lp in shares:
            m["lp_after"][share_rows] = share_lp
        d_lp = (lp - ref_lp[rows]).abs().max().item()
        d_ent = (ent - ref_ent[rows]).abs().max().item()
        assert d_lp < LP_TOL and d_ent < LP_TOL, (tp, pp, sp, d_lp, d_ent)
        if base is None:
            base = (m, weights)
            d_loss = d_norm = d_w = 0.0
        else:
            d_loss = abs(m["pg_loss"] - base[0]["pg_loss"])
            d_norm = abs(m["grad_norm"] - base[0]["grad_norm"])
            assert weights, "no weights on this stage"
            d_w = max((weights[k] - base[1][k]).abs().max().item() for k in weights)
            d_w = max(d_w, (m["lp_after"] - base[0]["lp_after"]).abs().max().item())
            moved = max((weights[k] - dict(hf_model.named_parameters())[k]).abs().max().item() for k in weights)
            assert moved > 1e-3, moved  # the 3 steps really changed the weights
        line = (
            f"ACTOR-OK layout tp={tp} pp={pp} sp={int(sp)} tied={tied} d_logprob={d_lp:.2e} d_entropy={d_ent:.2e} "
            f"d_loss={d_loss:.2e} d_grad_norm={d_norm:.2e} d_weights_and_logprobs_after_3_steps={d_w:.2e}"
        )
        assert d_loss < 1e-6 and d_norm < GRAD_NORM_RTOL * base[0]["grad_norm"] and d_w < WEIGHT_TOL, line
        lines.append(line)
    return lines


def check_uneven_logprobs(hf_dir, hf_model, hf_config, batch) -> list[str]:
    """DP ranks with different row counts: the short rank pads with dummy micro-batches."""
    from megatron.core import parallel_state as ps

    from dapo_megatron.actor.actor import MegatronActor
    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel

    ref_lp, ref_ent, _, _ = hf_oracle(hf_model, batch, "token-mean", AlgorithmConfig(), 0.0)
    init_parallel(1, 1, seed=1)
    try:
        longest = int(batch.seq_lengths.max())
        actor = MegatronActor(
            actor_cfg(1, 1, False, longest, dist_opt=True),
            AlgorithmConfig(),
            hf_config,
            weights=hf_dir,
            temperature=0.7,
        )
        rows = [0] if ps.get_data_parallel_rank() == 0 else [1, 2, 4, 6, 7]
        plans = actor._plan(batch, torch.tensor(rows))
        dummies = sum(mb.indices.numel() == 0 for mb in plans)
        counts = [None, None]
        dist.all_gather_object(counts, (len(plans), dummies))
        assert counts[0][0] == counts[1][0] and counts[0][1] > 0, counts
        lp, ent = actor.compute_log_probs(batch.select(rows))
        d = max((lp - ref_lp[rows]).abs().max().item(), (ent - ref_ent[rows]).abs().max().item())
        assert d < LP_TOL, d
    finally:
        destroy_parallel(destroy_process_group=False)
    return [f"ACTOR-OK uneven dp micro_batches={counts[0][0]} dummies_on_rank0={counts[0][1]} d={d:.2e}"]


def check_nonfinite(hf_dir, hf_config, batch) -> list[str]:
    from dapo_megatron.actor.actor import MegatronActor, NonFiniteUpdateError
    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel

    init_parallel(1, 1, seed=1)
    try:
        cfg = actor_cfg(1, 1, False, 256, dist_opt=True)
        cfg.ppo_mini_batch_size = 4
        cfg.max_consecutive_nonfinite = 2
        actor = MegatronActor(cfg, AlgorithmConfig(), hf_config, weights=hf_dir)
        share, _ = dp_share(batch.select(range(0, 4 * GROUP)), 4)
        share.group_size = GROUP
        bad = copy.copy(share)
        bad.advantages = share.advantages.clone()
        bad.advantages[0] = float("nan")
        before = [p.detach().clone() for p in actor.gpt.parameters()]
        m = actor.update(bad)  # NaN on one rank only: both ranks must skip
        assert m["actor/nonfinite_skips"] == 1 and actor.consecutive_nonfinite == 1, m
        assert all(torch.equal(a, p) for a, p in zip(before, actor.gpt.parameters(), strict=True))
        m = actor.update(share)
        assert m["actor/nonfinite_skips"] == 0 and actor.consecutive_nonfinite == 0, m
        assert any(not torch.equal(a, p) for a, p in zip(before, actor.gpt.parameters(), strict=True))
        actor.update(bad)
        try:
            actor.update(bad)
        except NonFiniteUpdateError as e:
            assert "max_consecutive_nonfinite=2" in str(e), e
        else:
            raise AssertionError("2 consecutive non-finite steps did not raise")
    finally:
        destroy_parallel(destroy_process_group=False)
    return ["ACTOR-OK nonfinite skip, reset and raise"]


def check_onpolicy(hf_dir, hf_config, batch) -> list[str]:
    """No old_log_probs = on-policy: the same step as with the log-probs of a separate forward."""
    from dapo_megatron.actor.actor import MegatronActor
    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel

    init_parallel(1, 1, seed=1)
    try:
        cfg = actor_cfg(1, 1, False, 256, dist_opt=True)
        cfg.ppo_mini_batch_size = 4
        share, _ = dp_share(batch.select(range(0, 4 * GROUP)), 4)
        share.group_size = GROUP
        weights, losses = [], []
        for on_policy in (False, True):
            actor = MegatronActor(cfg, AlgorithmConfig(), hf_config, weights=hf_dir)
            old = None if on_policy else actor.compute_log_probs(share, compute_entropy=False)[0]
            m = actor.update(dataclasses.replace(share, old_log_probs=old))
            weights.append([p.detach().clone() for p in actor.gpt.parameters()])
            losses.append(m["actor/pg_loss"])
        assert abs(losses[0] - losses[1]) <= 1e-6 * abs(losses[0]), losses
        worst = max(float((a - b).abs().max()) for a, b in zip(*weights, strict=True))
        assert worst <= WEIGHT_TOL, worst
        actor.cfg = dataclasses.replace(cfg, ppo_mini_batch_size=2)  # the same batch in 2 optimizer steps
        try:
            actor.update(dataclasses.replace(share, old_log_probs=None))
        except ValueError as e:
            assert "old_log_probs is None (on-policy)" in str(e) and "2 optimizer steps" in str(e), e
        else:
            raise AssertionError("an on-policy update over 2 mini-batches was not refused")
    finally:
        destroy_parallel(destroy_process_group=False)
    return [f"ACTOR-OK onpolicy same step as a separate forward (max weight diff {worst:.1e})"]


def parse_layouts(spec: str) -> tuple[tuple[int, int, bool], ...]:
    """ "2x1,2x1sp,1x2" -> ((2, 1, False), (2, 1, True), (1, 2, False)); the first is the baseline."""
    out = []
    for item in spec.split(","):
        tp, pp = (int(x) for x in item.removesuffix("sp").split("x"))
        out.append((tp, pp, item.endswith("sp")))
    return tuple(out)


def main(argv: list[str]) -> int:
    import argparse

    from transformers import AutoConfig, AutoModelForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts-only", default=None, help="only the layout check, for these TPxPP layouts")
    ap.add_argument("hf_dirs", nargs="+", help="untied HF dir [tied HF dir]")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    hf_dir = args.hf_dirs[0]
    hf_config = AutoConfig.from_pretrained(hf_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    batch = make_batch(hf_config.vocab_size)
    if args.layouts_only:
        lines = check_layouts(hf_dir, hf_model, hf_config, batch, parse_layouts(args.layouts_only))
    else:
        lines = check_grads(hf_dir, hf_model, hf_config, batch)
        lines += check_layouts(hf_dir, hf_model, hf_config, batch)
    if len(args.hf_dirs) > 1:  # tied embeddings: PP must keep the first-stage embedding and last-stage output in sync
        tied_dir = args.hf_dirs[1]
        tied_config = AutoConfig.from_pretrained(tied_dir)
        assert tied_config.tie_word_embeddings
        tied_model = AutoModelForCausalLM.from_pretrained(tied_dir, dtype=torch.float32, attn_implementation="eager")
        tied_layouts = parse_layouts(args.layouts_only) if args.layouts_only else ((1, 1, False), (1, 2, False))
        lines += check_layouts(tied_dir, tied_model, tied_config, batch, tied_layouts)
    if not args.layouts_only:
        lines += check_uneven_logprobs(hf_dir, hf_model, hf_config, batch)
        lines += check_nonfinite(hf_dir, hf_config, batch)
        lines += check_onpolicy(hf_dir, hf_config, batch)
    if dist.get_rank() == dist.get_world_size() - 1:
        for line in lines:
            print(line, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
