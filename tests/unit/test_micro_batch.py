"""Token-budget micro-batching: budgets hold, order is recoverable, the split never changes the loss."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_megatron.actor.micro_batch import (
    equalize_micro_batch_count,
    make_micro_batch,
    plan_micro_batches,
    scatter_to_input_order,
)
from dapo_megatron.algo.loss import LOSS_AGG_MODES, local_normalizer, policy_loss
from dapo_megatron.contract import ActorBatch

SETTINGS = settings(max_examples=40, deadline=None)


def random_batch(seed: int, n: int = 6, r: int = 7) -> ActorBatch:
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 6, (n,), generator=g)
    resp = torch.randint(0, r + 1, (n,), generator=g)
    seq = prompt + resp
    ids = torch.randint(0, 50, (n, int(seq.max()) + 2), generator=g)
    mask = (torch.arange(r)[None] < resp[:, None]) & (torch.rand(n, r, generator=g) > 0.2)
    old = -torch.rand(n, r, generator=g)
    return ActorBatch(ids, seq, prompt, mask, old, torch.randn(n, generator=g), group_size=1)


def fake_logprobs(tokens: torch.Tensor, labels: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A causal 'model' whose log-prob at position t depends on tokens[:t+1] and the label."""
    h = torch.cumsum(w[tokens], dim=1)
    return -torch.nn.functional.softplus(h * w[labels])


@given(lengths=st.lists(st.integers(1, 40), min_size=0, max_size=30), budget=st.integers(40, 200))
@SETTINGS
def test_plan_respects_budget_and_covers_every_row_once(lengths, budget):
    plans = plan_micro_batches(lengths, budget)
    flat = sorted(i for p in plans for i in p)
    assert flat == list(range(len(lengths)))
    for p in plans:
        assert p and len(p) * max(lengths[i] for i in p) <= budget


def test_plan_sorts_longest_first_and_names_an_oversized_row():
    assert plan_micro_batches([3, 9, 5, 9], 18) == [[1, 3], [2, 0]]
    with pytest.raises(ValueError, match="sequence 2 has 30 tokens.*max_tokens_per_micro_batch=20"):
        plan_micro_batches([3, 4, 30], 20)


@given(sizes=st.lists(st.integers(1, 5), min_size=0, max_size=6), extra=st.integers(0, 8))
@SETTINGS
def test_equalize_reaches_the_target_without_losing_rows(sizes, extra):
    plans, start = [], 0
    for s in sizes:
        plans.append(list(range(start, start + s)))
        start += s
    target = max(len(plans) + extra, 1)
    out = equalize_micro_batch_count(plans, target)
    assert len(out) == target
    assert sorted(i for p in out for i in p) == list(range(start))
    # dummies only once every real micro-batch is down to one row
    if any(len(p) == 0 for p in out):
        assert all(len(p) <= 1 for p in out)
    with pytest.raises(ValueError, match="target"):
        equalize_micro_batch_count([[0], [1]], 1)


def test_make_micro_batch_layout():
    ids = torch.tensor([[5, 6, 7, 8, 9, 1], [3, 4, 2, 2, 2, 2]])
    b = ActorBatch(
        ids,
        seq_lengths=torch.tensor([5, 3]),
        prompt_lengths=torch.tensor([2, 1]),
        response_mask=torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]]),
        old_log_probs=torch.arange(8.0).view(2, 4),
        advantages=torch.tensor([1.0, -1.0]),
    )
    mb = make_micro_batch(b, [1, 0], pad_token_id=0, pad_to_multiple=3)
    assert mb.tokens.tolist() == [[3, 4, 2, 0, 0, 0], [5, 6, 7, 8, 9, 0]]
    assert mb.labels[1, :4].tolist() == [6, 7, 8, 9]
    # row 0 (source 1): position 0 predicts response column 0, position 1 column 1
    assert mb.label_mask.tolist() == [
        [True, True, False, False, False, False],
        [False, True, False, True, False, False],
    ]
    assert mb.response_index[1, 3].item() == 2 and mb.old_log_probs[1, 3].item() == 2.0
    assert mb.advantages[0, 0].item() == -1.0
    out = scatter_to_input_order([mb], [mb.old_log_probs], 2, 4)
    assert torch.equal(out, b.old_log_probs.where(b.response_mask.bool(), 0.0))
    dummy = make_micro_batch(b, [], pad_to_multiple=4)
    assert dummy.tokens.shape == (1, 4) and not dummy.label_mask.any() and dummy.indices.numel() == 0


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@given(seed=st.integers(0, 10_000), budget=st.integers(12, 60))
@SETTINGS
def test_split_never_changes_loss_or_gradient(mode, seed, budget):
    batch = random_batch(seed)
    r = batch.max_response_length
    w = torch.randn(50, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)

    def loss_over(plans):
        mbs = [make_micro_batch(batch, p) for p in plans]
        norm = sum(float(local_normalizer(mb.label_mask, mode)) for mb in mbs if mb.indices.numel())
        total = 0.0
        for mb in mbs:
            lp = fake_logprobs(mb.tokens, mb.labels, w)
            total = (
                total
                + policy_loss(
                    lp,
                    mb.old_log_probs,
                    mb.advantages,
                    mb.label_mask,
                    loss_agg_mode=mode,
                    global_num_tokens=norm,
                    global_num_seqs=norm,
                    max_response_length=r,
                )["pg_loss"]
            )
        (g,) = torch.autograd.grad(total, w)
        return total.detach(), g

    whole, g_whole = loss_over([list(range(batch.num_sequences))])
    plans = plan_micro_batches(batch.seq_lengths, max(budget, int(batch.seq_lengths.max())))
    split, g_split = loss_over(equalize_micro_batch_count(plans, len(plans) + 2))
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_split, g_whole, rtol=1e-5, atol=1e-6)


def test_actor_batch_validation_names_the_field():
    ok = random_batch(0)
    with pytest.raises(ValueError, match="old_log_probs"):
        ActorBatch(ok.input_ids, ok.seq_lengths, ok.prompt_lengths, ok.response_mask, torch.zeros(6, 3))
    with pytest.raises(ValueError, match="group_size"):
        ActorBatch(ok.input_ids, ok.seq_lengths, ok.prompt_lengths, ok.response_mask, group_size=4)
    with pytest.raises(ValueError, match="prompt_lengths"):
        ActorBatch(ok.input_ids, ok.seq_lengths, ok.prompt_lengths * 0, ok.response_mask)
    mask = torch.ones_like(ok.response_mask)
    short = ok.seq_lengths.clone()
    short[:] = ok.prompt_lengths  # no response tokens at all, but the mask says otherwise
    with pytest.raises(ValueError, match="response_mask is set beyond"):
        ActorBatch(ok.input_ids, short, ok.prompt_lengths, mask)
