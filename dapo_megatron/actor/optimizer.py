"""Megatron DDP + optimizer construction and the learning-rate schedule.

The schedule is our own small function rather than megatron's ``OptimizerParamScheduler``:
RL runs count *optimizer steps* (one per mini-batch), the trainer checkpoints the step counter
anyway, and a pure function of the step is trivially resumable and unit-testable.

Gradient arithmetic (why ``calculate_per_token_loss=True`` and no token scaling): DAPO's loss
must be the exact mean over every valid token of the mini-batch, across micro-batches and DP
ranks.  Each micro-batch's loss is already ``local_sum / global_count`` (the global count is
all-reduced before the mini-batch), so the gradients only have to be *summed*:

* megatron's schedule divides a 2-tuple loss by ``num_microbatches`` and a 3-tuple loss by
  ``num_tokens * num_microbatches`` unless ``config.calculate_per_token_loss`` is set, in which
  case it leaves the loss alone;
* with ``calculate_per_token_loss`` DDP uses ``gradient_scaling_factor = 1`` (a plain SUM
  all-reduce / reduce-scatter over DP) instead of averaging over DP;
* megatron's ``finalize_model_grads`` would then divide the gradients by the all-reduced
  ``num_tokens`` that the loss functions returned; :func:`finalize_grads_without_token_scaling`
  passes ``num_tokens=None`` instead, because our normaliser is already inside the loss.

Net effect: grad = sum over DP ranks and micro-batches of d(local_sum / global_count), i.e.
exactly the gradient of the global mean.
"""

from __future__ import annotations

import math

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from dapo_megatron.actor import LR_SCHEDULES
from dapo_megatron.config import OptimConfig

__all__ = [
    "lr_at_step",
    "wrap_ddp",
    "build_optimizer",
    "finalize_grads_without_token_scaling",
    "set_lr",
]


def lr_at_step(step: int, optim: OptimConfig, total_steps: int | None = None) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warm-up ``lr * (step + 1) / (warmup + 1)`` over the first ``lr_warmup_steps`` steps
    (the first step is never taken at lr 0, which would waste a mini-batch), then "constant"
    (``lr``) or "cosine" from ``lr`` to ``min_lr`` over ``lr_decay_steps`` (default
    ``total_steps``) steps after warm-up, and ``min_lr`` afterwards.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warmup = optim.lr_warmup_steps
    if step < warmup:
        return optim.lr * (step + 1) / (warmup + 1)
    if optim.lr_decay_style == "constant":
        return optim.lr
    if optim.lr_decay_style != "cosine":
        raise ValueError(f"actor.optim.lr_decay_style: unknown {optim.lr_decay_style!r} ({', '.join(LR_SCHEDULES)})")
    decay_steps = optim.lr_decay_steps if optim.lr_decay_steps is not None else total_steps
    if decay_steps is None or decay_steps <= 0:
        raise ValueError("actor.optim.lr_decay_steps (or the trainer's total steps) must be > 0 for cosine decay")
    progress = min((step - warmup) / decay_steps, 1.0)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    """Set ``lr`` on every parameter group (megatron's chained optimizer exposes them all)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def finalize_grads_without_token_scaling(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
    """megatron's ``finalize_model_grads`` with ``num_tokens`` dropped (see module docstring)."""
    del num_tokens
    return finalize_model_grads(model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)


def wrap_ddp(
    model: torch.nn.Module,
    *,
    use_distributed_optimizer: bool,
    overlap_grad_reduce: bool = True,
    bucket_size: int | None = None,
):
    """Wrap a GPTModel in megatron DDP with fp32 grad buffers and a SUM reduction.

    The model's TransformerConfig must have ``calculate_per_token_loss=True`` (checked, since
    otherwise DDP silently averages over DP and the global-mean arithmetic breaks).

    ``overlap_grad_reduce``: gradients are reduced (reduce-scattered with the distributed
    optimizer) bucket by bucket, asynchronously, as the last micro-batch's backward fills each
    bucket; megatron's ``finalize_model_grads`` waits for them.  Without it there is one bucket
    of every gradient (8 GB of fp32 at 32B), reduced after the backward pass, and the fully
    reshardable checkpoint's gather allocates a bucket-sized buffer per optimizer-state key.
    ``bucket_size`` (parameters; None: megatron's ``max(40M, 1M x DP)``) applies with overlap.
    The parameter all-gather after the optimizer step is not overlapped: the weight sync and
    the checkpoint read the parameters right after the update, before any forward pass could
    wait for an overlapped gather.
    """
    config = model.config
    if not config.calculate_per_token_loss:
        raise ValueError("the model's TransformerConfig needs calculate_per_token_loss=True (gradients are summed)")
    if bucket_size is not None and not overlap_grad_reduce:
        raise ValueError("actor.ddp.bucket_size needs actor.ddp.overlap_grad_reduce=true")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=False,
        bucket_size=bucket_size,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,  # non-finite steps are skipped by the actor, not raised here
        average_in_collective=False,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    config.no_sync_func = ddp.no_sync
    if overlap_grad_reduce:
        # as Megatron-LM (align_grad_reduce): pipelined schedules start each stage's reduction
        config.grad_sync_func = ddp.start_grad_sync
    config.finalize_model_grads_func = finalize_grads_without_token_scaling
    return ddp


def build_optimizer(ddp_model, optim: OptimConfig, *, params_dtype: torch.dtype = torch.float32):
    """megatron's Adam (weight decay off for biases and 1-D params) with gradient clipping."""
    cfg = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        use_distributed_optimizer=optim.use_distributed_optimizer,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
    )
    return get_megatron_optimizer(cfg, [ddp_model])
