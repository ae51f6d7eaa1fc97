"""Helpers shared by the checkpoint / conversion workers: forward passes and HF references."""

from __future__ import annotations

import torch
import torch.distributed as dist


def forward_logits(model, input_ids: torch.Tensor, hidden_size: int) -> torch.Tensor | None:
    """Full-vocab logits ``[b, s, V]`` (vocab padding trimmed) on the last PP stage, None elsewhere.

    PP stages hand hidden states over with send/recv; TP shards of the logits are
    all-gathered (test only: real consumers never gather the vocabulary).
    """
    from megatron.core import parallel_state as ps

    b, s = input_ids.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    pp_group = ps.get_pipeline_model_parallel_group()
    pp_rank, pp_size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    model.eval()
    with torch.no_grad():
        if pp_rank > 0:
            recv = torch.empty(s, b, hidden_size)
            dist.recv(recv, group=pp_group, group_src=pp_rank - 1)
            model.set_input_tensor(recv)
        out = model(input_ids=input_ids if pp_rank == 0 else None, position_ids=position_ids, attention_mask=mask)
        if pp_rank < pp_size - 1:
            dist.send(out.contiguous(), group=pp_group, group_dst=pp_rank + 1)
            return None
    tp = ps.get_tensor_model_parallel_world_size()
    parts = [torch.empty_like(out) for _ in range(tp)]
    dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)[..., : model.hf_vocab_size]


def hf_logits(hf_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    """transformers' fp32 logits for ``input_ids`` (eager attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def fixed_tokens(vocab_size: int, seed: int = 1234) -> torch.Tensor:
    """The same random token batch on every rank."""
    return torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
