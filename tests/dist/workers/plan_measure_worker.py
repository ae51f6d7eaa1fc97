"""Build the real actor in one layout, take one step, and report the bytes the planner models.

Measured on the objects themselves (parameters, DDP grad buffers, optimizer state tensors):
on CPU the process's resident memory is dominated by the runtime (torch, vLLM, megatron
imports, ~2 GB), which would hide any error in the per-rank formulas being checked.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def main() -> None:
    from dapo_megatron.actor.actor import MegatronActor
    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel
    from dapo_megatron.config import load_config
    from dapo_megatron.contract import ActorBatch
    from tests.tiny_models import tiny_config

    tp, pp, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    init_parallel(tp, pp, seed=0)
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    cfg = load_config(
        None,
        [
            "actor.params_dtype=float32",
            f"actor.parallel.tensor_model_parallel_size={tp}",
            f"actor.parallel.pipeline_model_parallel_size={pp}",
            f"actor.ppo_mini_batch_size={dp}",
            f"data.train_batch_size={dp}",
        ],
    )
    hf = tiny_config(num_hidden_layers=4, tie_word_embeddings=False)  # test_plan_measured.SHAPE reads the same
    actor = MegatronActor(cfg.actor, cfg.algorithm, hf)
    ids = torch.randint(0, 300, (1, 12))
    batch = ActorBatch(
        input_ids=ids,
        seq_lengths=torch.tensor([12]),
        prompt_lengths=torch.tensor([4]),
        response_mask=torch.ones(1, 8, dtype=torch.bool),
        advantages=torch.ones(1),
    )
    old, _ = actor.compute_log_probs(batch, compute_entropy=False)
    import dataclasses

    actor.update(dataclasses.replace(batch, old_log_probs=old))
    params = sum(p.numel() for p in actor.gpt.parameters())
    grads = sum(tensor_bytes(b.grad_data) for b in actor.model.buffers)
    optim_bytes = 0
    for opt in getattr(actor.optimizer, "chained_optimizers", None) or [actor.optimizer]:
        for state in opt.optimizer.state.values():
            optim_bytes += sum(tensor_bytes(v) for k, v in state.items() if torch.is_tensor(v) and k != "step")
    row = {
        "rank": dist.get_rank(),
        "stage": ps.get_pipeline_model_parallel_rank(),
        "dp": dp,
        "params": params,
        "grad_bytes": grads,
        "optimizer_bytes": optim_bytes,
    }
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    destroy_parallel()


if __name__ == "__main__":
    main()
