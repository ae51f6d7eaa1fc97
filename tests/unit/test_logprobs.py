"""vocab_parallel_logprobs_and_entropy at TP=1 (no process group) == naive log_softmax + gather."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_megatron.actor.logprobs import naive_logprobs_and_entropy, vocab_parallel_logprobs_and_entropy


def _case(shape, vocab, padded, seed=0, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(*shape, padded, generator=g, dtype=torch.float64)
    logits[..., vocab:] = 0.0  # Megatron's padded rows give exactly-0 logits
    labels = torch.randint(0, vocab, shape, generator=g)
    return logits.to(dtype), labels


def _values_and_grads(fn, logits, labels, g_lp, g_h):
    x = logits.detach().clone().requires_grad_(True)
    lp, ent = fn(x, labels)
    (lp * g_lp).sum().add((ent * g_h).sum()).backward()
    return lp.detach(), ent.detach(), x.grad


def _compare(logits, labels, vocab, temperature, atol, chunk_elems=1 << 24, seed=1, grad_rtol=0.0):
    g = torch.Generator().manual_seed(seed)
    g_lp = torch.randn(labels.shape, generator=g, dtype=torch.float64)
    g_h = torch.randn(labels.shape, generator=g, dtype=torch.float64)
    ours = _values_and_grads(
        lambda x, y: vocab_parallel_logprobs_and_entropy(
            x, y, temperature=temperature, vocab_size=vocab, chunk_elems=chunk_elems
        ),
        logits,
        labels,
        g_lp.to(torch.float32 if logits.dtype != torch.float64 else torch.float64),
        g_h.to(torch.float32 if logits.dtype != torch.float64 else torch.float64),
    )
    ref_logits = logits.double()
    ref = _values_and_grads(
        lambda x, y: naive_logprobs_and_entropy(x, y, temperature, vocab), ref_logits, labels, g_lp, g_h
    )
    for name, a, b in zip(("logprob", "entropy"), ours[:2], ref[:2], strict=True):
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=0, msg=name)
    grad_ours, grad_ref = ours[2], ref[2]
    assert grad_ours.dtype == logits.dtype
    assert torch.count_nonzero(grad_ours[..., vocab:]) == 0  # padded columns get no gradient
    torch.testing.assert_close(grad_ours.double(), grad_ref, atol=atol, rtol=grad_rtol, msg="grad")
    return ours


def test_gradcheck_float64():
    logits, labels = _case((3, 4), vocab=29, padded=32, dtype=torch.float64)
    x = logits.clone().requires_grad_(True)
    for compute_entropy in (True, False):

        def f(a, ce=compute_entropy):
            lp, ent = vocab_parallel_logprobs_and_entropy(
                a, labels, temperature=0.6, vocab_size=29, compute_entropy=ce, chunk_elems=40
            )
            return (lp, ent) if ce else lp

        assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("chunk_elems", [1 << 24, 100])  # one chunk / many uneven chunks
def test_matches_naive_fp32(temperature, chunk_elems):
    logits, labels = _case((7, 3), vocab=300, padded=384)
    _compare(logits, labels, 300, temperature, atol=1e-5, chunk_elems=chunk_elems)


def test_padded_columns_do_not_matter():
    """Padded columns holding 0 or huge values change nothing (values and real-column grads)."""
    logits, labels = _case((5, 4), vocab=300, padded=384, scale=1.0)  # small logits: 0s would matter
    base = vocab_parallel_logprobs_and_entropy(logits, labels, temperature=0.9, vocab_size=300)
    # sanity: including the zero columns *would* change the result
    wrong = vocab_parallel_logprobs_and_entropy(logits, labels, temperature=0.9)
    assert (wrong[0] - base[0]).abs().max() > 1e-2
    for fill in (1e4, -1e4, 3e38, float("inf"), float("nan")):
        dirty = logits.clone()
        dirty[..., 300:] = fill
        x = dirty.requires_grad_(True)
        lp, ent = vocab_parallel_logprobs_and_entropy(x, labels, temperature=0.9, vocab_size=300)
        torch.testing.assert_close(lp, base[0], atol=0, rtol=0)
        torch.testing.assert_close(ent, base[1], atol=0, rtol=0)
        (lp.sum() + ent.sum()).backward()
        assert torch.isfinite(x.grad).all() and torch.count_nonzero(x.grad[..., 300:]) == 0


def test_bf16_input():
    logits, labels = _case((6, 5), vocab=300, padded=384, dtype=torch.bfloat16)
    # ref computed in float64 from the same bf16 values; our gradient is rounded to bf16 (8 bits)
    lp, ent, grad = _compare(logits, labels, 300, 0.8, atol=1e-4, grad_rtol=2**-8)
    assert lp.dtype == ent.dtype == torch.float32 and grad.dtype == torch.bfloat16


def test_megatron_layout_and_outputs():
    """[s, b, v] in, [s, b] out; entropy None when not asked for; only-logprob backward works."""
    logits, labels = _case((9, 2), vocab=50, padded=64)
    x = logits.clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs_and_entropy(x, labels, vocab_size=50, compute_entropy=False)
    assert lp.shape == (9, 2) and ent is None
    lp.sum().backward()
    ref = logits.clone().requires_grad_(True)
    naive_logprobs_and_entropy(ref, labels, 1.0, 50)[0].sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, atol=1e-6, rtol=0)
    # entropy computed but only log-probs used downstream
    x.grad = None
    lp, ent = vocab_parallel_logprobs_and_entropy(x, labels, vocab_size=50)
    lp.sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, atol=1e-6, rtol=0)
    # only the entropy used downstream (log-prob grad is None inside backward)
    x.grad, ref.grad = None, None
    vocab_parallel_logprobs_and_entropy(x, labels, temperature=0.8, vocab_size=50)[1].sum().backward()
    naive_logprobs_and_entropy(ref, labels, 0.8, 50)[1].sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, atol=1e-6, rtol=0)
    # non-contiguous input (transposed [b, s, v] view)
    lp_t, _ = vocab_parallel_logprobs_and_entropy(logits.transpose(0, 1), labels.t(), vocab_size=50)
    torch.testing.assert_close(lp_t.t(), vocab_parallel_logprobs_and_entropy(logits, labels, vocab_size=50)[0])


def test_errors():
    logits, labels = _case((2, 3), vocab=10, padded=16)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs_and_entropy(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="labels shape"):
        vocab_parallel_logprobs_and_entropy(logits, labels[:, :2])
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_logprobs_and_entropy(logits, labels, vocab_size=17)  # > shard x tp=1


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    vocab=st.integers(2, 70),
    pad=st.integers(0, 20),
    temperature=st.floats(0.3, 2.0),
    chunk_elems=st.sampled_from([1, 37, 1 << 24]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes(lead, vocab, pad, temperature, chunk_elems, seed):
    logits, labels = _case(tuple(lead), vocab=vocab, padded=vocab + pad, seed=seed)
    _compare(logits, labels, vocab, temperature, atol=2e-5, chunk_elems=chunk_elems, seed=seed + 1)
