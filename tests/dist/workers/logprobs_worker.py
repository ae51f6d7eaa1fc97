"""vocab_parallel_logprobs_and_entropy at TP=2 == naive log_softmax on the full logits.

Usage (2 ranks)::

    torchrun --nproc_per_node=2 logprobs_worker.py [HF_DIR]

One launch, several checks; rank 0 prints ``LOGPROBS-OK <check> ...`` per passed check:

* synthetic: every rank holds its vocab shard of the same full fp32 logits (300 real columns
  padded to 384, padding = exact zeros), for several temperatures / chunk sizes / explicit
  and default TP group / a layout where rank 1 holds only padding.  Values must equal the
  naive reference on the full logits, and each rank's gradient must equal its shard of the
  full gradient (random upstream grads on both outputs), within 1e-5.
* model (if HF_DIR is given): a tiny Qwen2 built at TP=2 and loaded from HF_DIR; its
  vocab-parallel logits go through our function and must give HF transformers' log-probs
  and entropies; the output-layer weight gradient must equal HF's lm_head gradient shard.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from dapo_megatron.actor.logprobs import naive_logprobs_and_entropy, vocab_parallel_logprobs_and_entropy

TOL = 1e-5
MODEL_TOL = 1e-4


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_synthetic(name, *, vocab, padded, temperature, chunk_elems, explicit_group, compute_entropy=True):
    from megatron.core import parallel_state as ps

    rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    g = torch.Generator().manual_seed(vocab + padded)  # same full tensors on every rank
    full = 4.0 * torch.randn(6, 3, padded, generator=g)
    full[..., vocab:] = 0.0
    labels = torch.randint(0, vocab, (6, 3), generator=g)
    g_lp, g_h = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    if not compute_entropy:
        g_h.zero_()

    ref_x = full.clone().requires_grad_(True)
    ref_lp, ref_h = naive_logprobs_and_entropy(ref_x, labels, temperature, vocab)
    ((ref_lp * g_lp).sum() + (ref_h * g_h).sum()).backward()

    shard = padded // tp
    x = full[..., rank * shard : (rank + 1) * shard].clone().requires_grad_(True)
    lp, h = vocab_parallel_logprobs_and_entropy(
        x,
        labels,
        temperature=temperature,
        vocab_size=vocab,
        compute_entropy=compute_entropy,
        tp_group=ps.get_tensor_model_parallel_group() if explicit_group else None,
        chunk_elems=chunk_elems,
    )
    loss = (lp * g_lp).sum() + ((h * g_h).sum() if compute_entropy else 0.0)
    loss.backward()

    d_lp = _maxdiff(lp, ref_lp)
    d_h = _maxdiff(h, ref_h) if compute_entropy else 0.0
    d_g = _maxdiff(x.grad, ref_x.grad[..., rank * shard : (rank + 1) * shard])
    assert max(d_lp, d_h, d_g) < TOL, (name, rank, d_lp, d_h, d_g)
    assert compute_entropy or h is None
    return f"LOGPROBS-OK {name} rank={rank} d_logprob={d_lp:.2e} d_entropy={d_h:.2e} d_grad={d_g:.2e}"


def check_model(hf_dir: str, temperature: float) -> str:
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig, AutoModelForCausalLM

    from dapo_megatron.actor.hf_loading import load_hf_weights_into_model
    from dapo_megatron.actor.model import build_gpt_model

    rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    hf_config = AutoConfig.from_pretrained(hf_dir)
    model = build_gpt_model(hf_config)
    load_hf_weights_into_model(model, hf_dir, hf_config)
    model.eval()  # no dropout configured anyway; keeps parity with HF eval

    input_ids = torch.randint(0, hf_config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))
    b, s = input_ids.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask)  # [b, s, V_pad/tp]
    assert logits.shape[-1] * tp == model.padded_vocab_size
    lp, h = vocab_parallel_logprobs_and_entropy(
        logits[:, :-1], input_ids[:, 1:], temperature=temperature, vocab_size=model.hf_vocab_size
    )
    (lp.sum() + 0.1 * h.sum()).backward()

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    ref_lp, ref_h = naive_logprobs_and_entropy(hf(input_ids=input_ids).logits[:, :-1], input_ids[:, 1:], temperature)
    (ref_lp.sum() + 0.1 * ref_h.sum()).backward()

    d_lp, d_h = _maxdiff(lp, ref_lp), _maxdiff(h, ref_h)
    shard = logits.shape[-1]
    start = rank * shard
    n_valid = min(max(model.hf_vocab_size - start, 0), shard)
    w_grad = model.output_layer.weight.grad
    assert torch.count_nonzero(w_grad[n_valid:]) == 0  # padded vocab rows get no gradient
    ref_w_grad = hf.lm_head.weight.grad[start : start + n_valid]
    d_g = _maxdiff(w_grad[:n_valid], ref_w_grad)
    scale = ref_w_grad.abs().max().item()
    assert d_lp < MODEL_TOL and d_h < MODEL_TOL and d_g < MODEL_TOL * max(1.0, scale), (rank, d_lp, d_h, d_g)
    return (
        f"LOGPROBS-OK model_T{temperature} rank={rank} d_logprob={d_lp:.2e} d_entropy={d_h:.2e} "
        f"d_lm_head_grad={d_g:.2e}"
    )


def main(argv: list[str]) -> int:
    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel

    torch.set_num_threads(1)
    init_parallel(tp=2, pp=1, seed=1234)
    lines = [
        check_synthetic(
            "pad300of384_T1", vocab=300, padded=384, temperature=1.0, chunk_elems=1 << 24, explicit_group=False
        ),
        check_synthetic(
            "pad300of384_T0.7_chunked", vocab=300, padded=384, temperature=0.7, chunk_elems=500, explicit_group=True
        ),
        check_synthetic(
            "nopad384_T1.3", vocab=384, padded=384, temperature=1.3, chunk_elems=1 << 24, explicit_group=False
        ),
        check_synthetic(
            "rank1_all_padding", vocab=150, padded=384, temperature=0.9, chunk_elems=1 << 24, explicit_group=False
        ),
        check_synthetic(
            "no_entropy",
            vocab=300,
            padded=384,
            temperature=0.8,
            chunk_elems=1 << 24,
            explicit_group=False,
            compute_entropy=False,
        ),
    ]
    if argv:
        lines += [check_model(argv[0], 1.0), check_model(argv[0], 0.6)]
    # every rank asserted its own shard; gather the lines so rank 0 reports both ranks
    all_lines: list = [None] * dist.get_world_size()
    dist.all_gather_object(all_lines, lines)
    if dist.get_rank() == 0:
        for rank_lines in all_lines:
            for line in rank_lines:
                print(line, flush=True)
    dist.barrier()
    destroy_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
