"""The Megatron actor: log-probs (old policy, entropy) and the DAPO policy update.

Everything goes through megatron's ``get_forward_backward_func`` so the same code runs with
and without pipeline parallelism: ``forward_step(data_iterator, model)`` returns the model
output and a loss function; the schedule hands hidden states between PP stages and calls the
loss function on the last stage only.  The last stage computes vocab-parallel log-probs and
entropy (no vocabulary gather); per-sequence results are broadcast from the last PP stage to
the other stages, and scalar metrics are then all-reduced over DP.

What a batch holds per rank: :class:`ActorBatch` with this DP rank's share of the step's prompt
groups (``rollout.n`` responses per prompt, contiguous).  Every TP/PP rank of one model-parallel
group receives the same batch.  One optimizer step is taken per mini-batch of
``ppo_mini_batch_size`` prompt groups *globally*, i.e. ``ppo_mini_batch_size / dp`` groups from
each rank's batch; ``ppo_epochs`` passes are made over the batch.

The exact global normaliser: before each mini-batch the local normaliser
(:func:`dapo_megatron.algo.loss.local_normalizer`) of all its micro-batches is summed and
all-reduced over DP; every micro-batch's loss is ``local_sum / global_count`` and gradients are
summed (see :mod:`dapo_megatron.actor.optimizer` for how megatron's scaling is neutralised), so
the gradient is that of the exact mini-batch mean for every ``loss_agg_mode``.
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Mapping
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from dapo_megatron.actor import RECOMPUTE
from dapo_megatron.actor.hf_loading import load_hf_weights_into_model
from dapo_megatron.actor.logprobs import vocab_parallel_logprobs_and_entropy
from dapo_megatron.actor.micro_batch import (
    MicroBatch,
    equalize_micro_batch_count,
    make_micro_batch,
    plan_micro_batches,
    scatter_to_input_order,
)
from dapo_megatron.actor.model import build_gpt_model
from dapo_megatron.actor.offload import ActorOffloader, OffloadStats
from dapo_megatron.actor.optimizer import build_optimizer, lr_at_step, set_lr, wrap_ddp
from dapo_megatron.algo.loss import aggregate_loss, local_normalizer, policy_loss
from dapo_megatron.config import ActorConfig, AlgorithmConfig
from dapo_megatron.contract import ActorBatch
from dapo_megatron.torch_dtypes import torch_dtype

__all__ = ["MegatronActor", "NonFinitePolicyError", "NonFiniteUpdateError", "memory_metrics"]

# order of the per-micro-batch statistics vector returned by the loss function
_STATS = ("pg_loss", "entropy", "clipfrac_sum", "clipfrac_lower_sum", "kl_sum", "tokens")


class NonFiniteUpdateError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient norm."""


class NonFinitePolicyError(RuntimeError):
    """The current weights themselves give non-finite log-probs: skipping steps cannot help."""


def _recompute_overrides(mode: str) -> dict:
    if mode == "none":
        return {}
    if mode == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if mode == "selective":
        return dict(recompute_granularity="selective")
    raise ValueError(f"actor.recompute: unknown {mode!r} ({', '.join(RECOMPUTE)})")


class MegatronActor:
    """This rank's shard of the policy, its DDP wrapper, optimizer and LR schedule.

    Requires :func:`dapo_megatron.actor.parallel.init_parallel` with the layout of
    ``actor_cfg.parallel``.

    Args:
        actor_cfg: model/optimizer/micro-batching settings.
        algo_cfg: clip ratios and ``loss_agg_mode``.
        hf_config: the HF config of the policy.
        weights: HF checkpoint directory or HF state dict to load (None: keep the random init).
        temperature: rollout sampling temperature; logits are divided by it for every log-prob.
        total_training_steps: for cosine decay when ``optim.lr_decay_steps`` is None.
        pad_token_id: token id written into padding positions (never attended to by real tokens).
    """

    def __init__(
        self,
        actor_cfg: ActorConfig,
        algo_cfg: AlgorithmConfig,
        hf_config,
        *,
        weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
        temperature: float = 1.0,
        total_training_steps: int | None = None,
        pad_token_id: int = 0,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.cfg = actor_cfg
        self.algo = algo_cfg
        self.temperature = float(temperature)
        self.total_training_steps = total_training_steps
        self.pad_token_id = pad_token_id
        par = actor_cfg.parallel
        if ps.get_tensor_model_parallel_world_size() != par.tensor_model_parallel_size:
            raise ValueError(
                f"actor.parallel.tensor_model_parallel_size={par.tensor_model_parallel_size} but megatron's "
                f"parallel state has tp={ps.get_tensor_model_parallel_world_size()}"
            )
        if ps.get_pipeline_model_parallel_world_size() != par.pipeline_model_parallel_size:
            raise ValueError(
                f"actor.parallel.pipeline_model_parallel_size={par.pipeline_model_parallel_size} but megatron's "
                f"parallel state has pp={ps.get_pipeline_model_parallel_world_size()}"
            )
        if actor_cfg.params_dtype == "float16":
            raise ValueError(
                "actor.params_dtype=float16 is not supported: megatron's dynamic loss scaling is not wired; "
                "use bfloat16"
            )
        self.params_dtype = torch_dtype(actor_cfg.params_dtype, "actor.params_dtype")
        if self.params_dtype != torch.float32 and not torch.cuda.is_available():
            raise ValueError(f"actor.params_dtype={actor_cfg.params_dtype!r} needs CUDA; use float32 on CPU")
        self.dp_group = ps.get_data_parallel_group()
        self.dp_size = ps.get_data_parallel_world_size()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.pp_last_rank = ps.get_pipeline_model_parallel_last_rank()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.sequence_parallel = par.sequence_parallel
        # batches arrive on CPU; micro-batches and collective buffers live on the model's device
        # (nccl only reduces CUDA tensors)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None

        model = build_gpt_model(
            hf_config,
            sequence_parallel=par.sequence_parallel,
            params_dtype=self.params_dtype,
            calculate_per_token_loss=True,
            transformer_impl=actor_cfg.transformer_impl,
            **_recompute_overrides(actor_cfg.recompute),
        )
        # Micro-batches differ in shape, so PP stages must exchange shapes before each send.
        # Set after construction: TransformerConfig's __post_init__ refuses the flag with the
        # default MoE token dispatcher even for dense models.
        model.config.variable_seq_lengths = True
        if weights is not None:
            load_hf_weights_into_model(model, weights, hf_config)
        self.hf_vocab_size = model.hf_vocab_size
        self.gpt = model
        self.model = wrap_ddp(
            model,
            use_distributed_optimizer=actor_cfg.optim.use_distributed_optimizer,
            overlap_grad_reduce=actor_cfg.ddp.overlap_grad_reduce,
            bucket_size=actor_cfg.ddp.bucket_size,
        )
        self.optimizer = build_optimizer(self.model, actor_cfg.optim, params_dtype=self.params_dtype)
        self.offloader = ActorOffloader(self.model, self.optimizer)
        self.update_count = 0  # training steps taken (LR schedule position)
        self.consecutive_nonfinite = 0
        self.nonfinite_skips = 0

    # ------------------------------------------------------------------ offload
    def offload(self, kinds: tuple[str, ...]) -> OffloadStats:
        """Move ``kinds`` (params, grads, optimizer) to host memory; see :mod:`dapo_megatron.actor.offload`."""
        return self.offloader.offload(kinds)

    def onload(self, kinds: tuple[str, ...]) -> OffloadStats:
        return self.offloader.onload(kinds)

    def require_resident(self, kinds: tuple[str, ...], what: str) -> None:
        """Raise :class:`~dapo_megatron.actor.offload.ActorStateOffloadedError` if any of ``kinds`` is away."""
        self.offloader.require(kinds, what)

    # ------------------------------------------------------------------ micro-batches
    def _plan(self, batch: ActorBatch, indices: torch.Tensor) -> list[MicroBatch]:
        """Token-budget micro-batches of rows ``indices``, the same count on every DP rank."""
        lengths = batch.seq_lengths[indices]
        if self.cfg.use_dynamic_bsz:
            plans = plan_micro_batches(lengths, self.cfg.max_tokens_per_micro_batch)
        else:
            mbs = self.cfg.micro_batch_size
            plans = [list(range(i, min(i + mbs, len(lengths)))) for i in range(0, len(lengths), mbs)]
        count = self._dev(torch.tensor([len(plans)], dtype=torch.long))
        if self.dp_size > 1:
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.dp_group)
        plans = equalize_micro_batch_count(plans, max(int(count.item()), 1))
        multiple = self.tp_size if self.sequence_parallel else 1
        sub = batch.select(indices)
        mbs = [make_micro_batch(sub, p, self.pad_token_id, pad_to_multiple=multiple) for p in plans]
        return mbs if self.device is None else [mb.to(self.device) for mb in mbs]

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.device is None else t.to(self.device)

    def _schedule(self, micro_batches: list[MicroBatch], forward_step, *, forward_only: bool) -> list:
        fb = get_forward_backward_func()
        return fb(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=self.model,
            num_microbatches=len(micro_batches),
            seq_length=max(mb.tokens.shape[1] for mb in micro_batches),
            micro_batch_size=max(mb.tokens.shape[0] for mb in micro_batches),
            forward_only=forward_only,
        )

    def _run_model(self, data_iterator, model, loss_fn):
        mb: MicroBatch = next(data_iterator)
        # [b, s, v/tp] logits on the last stage, hidden states elsewhere
        output = model(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=None)
        return output, partial(loss_fn, mb)

    def _logprobs(self, mb: MicroBatch, logits: torch.Tensor, compute_entropy: bool):
        if logits.shape[:2] != mb.labels.shape:
            raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(mb.labels.shape)}")
        return vocab_parallel_logprobs_and_entropy(
            logits,
            mb.labels,
            temperature=self.temperature,
            vocab_size=self.hf_vocab_size,
            compute_entropy=compute_entropy,
        )

    def _broadcast_from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` of the last PP stage on every stage (returned on CPU)."""
        if self.pp_size > 1:
            buf = self._dev(t)
            dist.broadcast(buf, src=self.pp_last_rank, group=self.pp_group)
            t = buf.cpu()
        return t

    # ------------------------------------------------------------------- log-probs
    @torch.no_grad()
    def compute_log_probs(self, batch: ActorBatch, *, compute_entropy: bool = True):
        """Per-token log-probs (and entropy) of the response tokens at ``temperature``.

        Returns ``(log_probs, entropy)``, each ``[N, R]`` float32 in the batch's row order,
        0 where ``response_mask`` is 0 (entropy is None when not requested).  Identical on
        every rank of the model-parallel group.
        """
        self.require_resident(("params",), "compute log-probs")
        self.model.eval()
        mbs = self._plan(batch, torch.arange(batch.num_sequences))

        def collect(mb: MicroBatch, output: torch.Tensor):
            lp, ent = self._logprobs(mb, output, compute_entropy)
            return torch.zeros(()), {"lp": lp, "ent": ent}

        store = self._schedule(mbs, partial(self._run_model, loss_fn=collect), forward_only=True)
        n, r = batch.num_sequences, batch.max_response_length
        if self.is_last_stage:
            lp = scatter_to_input_order(mbs, [d["lp"] for d in store], n, r)
            ent = scatter_to_input_order(mbs, [d["ent"] for d in store], n, r) if compute_entropy else None
        else:
            lp = torch.zeros(n, r)
            ent = torch.zeros(n, r) if compute_entropy else None
        lp = self._broadcast_from_last_stage(lp)
        if ent is not None:
            ent = self._broadcast_from_last_stage(ent)
        return lp, ent

    # ---------------------------------------------------------------------- update
    def _mini_batch_slices(self, batch: ActorBatch) -> list[torch.Tensor]:
        mini = self.cfg.ppo_mini_batch_size
        if mini % self.dp_size:
            raise ValueError(f"actor.ppo_mini_batch_size={mini} is not divisible by data-parallel size {self.dp_size}")
        per_rank = mini // self.dp_size * batch.group_size
        n = batch.num_sequences
        if n == 0 or n % per_rank:
            raise ValueError(
                f"this rank's batch has {n} sequences, not a positive multiple of ppo_mini_batch_size/dp * "
                f"group_size = {mini}/{self.dp_size} * {batch.group_size} = {per_rank}"
            )
        count = self._dev(torch.tensor([n // per_rank, -(n // per_rank)], dtype=torch.long))
        if self.dp_size > 1:
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.dp_group)
        if int(count[0]) != -int(count[1]):
            raise ValueError("DP ranks received different numbers of mini-batches (uneven batch split)")
        return [torch.arange(i, i + per_rank) for i in range(0, n, per_rank)]

    def forward_backward(self, batch: ActorBatch, *, inject_nan: bool = False) -> dict[str, float]:
        """Forward + backward of ONE mini-batch (all of ``batch``); gradients are left in the DDP
        buffers, reduced over DP, ready for the optimizer.  Returns the mini-batch statistics.
        ``inject_nan`` makes the loss NaN (``actor.inject_nan_loss_at_steps``)."""
        if batch.advantages is None:
            raise ValueError("update needs ActorBatch.advantages")
        mode = self.algo.loss_agg_mode
        mbs = self._plan(batch, torch.arange(batch.num_sequences))
        norm = self._dev(torch.zeros((), dtype=torch.float64))
        for mb in mbs:
            if mb.indices.numel():  # a dummy micro-batch is no sequence, not even for seq-mean-token-sum-norm
                norm += local_normalizer(mb.label_mask, mode).double()
        if self.dp_size > 1:
            dist.all_reduce(norm, group=self.dp_group)
        global_count = norm.float()
        coeff = self.cfg.entropy_coeff
        max_len = batch.max_response_length

        def loss_fn(mb: MicroBatch, output: torch.Tensor):
            lp, ent = self._logprobs(mb, output, True)
            out = policy_loss(
                lp,
                lp.detach() if mb.old_log_probs is None else mb.old_log_probs,
                mb.advantages,
                mb.label_mask,
                clip_ratio_low=self.algo.clip_ratio_low,
                clip_ratio_high=self.algo.clip_ratio_high,
                clip_ratio_c=self.algo.clip_ratio_c,
                loss_agg_mode=mode,
                global_num_tokens=global_count,
                global_num_seqs=global_count,
                max_response_length=max_len,
            )
            ent_agg = aggregate_loss(
                ent,
                mb.label_mask,
                mode,
                global_num_tokens=global_count,
                global_num_seqs=global_count,
                max_response_length=max_len,
            )
            loss = out["pg_loss"] - coeff * ent_agg if coeff else out["pg_loss"]
            pg_loss = out["pg_loss"].detach()
            if inject_nan:
                loss, pg_loss = loss * float("nan"), pg_loss * float("nan")
            ntok = mb.label_mask.sum().float()
            stats = torch.stack(
                [
                    pg_loss,
                    ent_agg.detach(),
                    out["pg_clipfrac"] * ntok,
                    out["pg_clipfrac_lower"] * ntok,
                    out["ppo_kl"] * ntok,
                    ntok,
                ]
            ).double()
            # (loss, num_tokens, dict): with calculate_per_token_loss megatron leaves the loss unscaled
            return loss, torch.zeros((), dtype=torch.int, device=loss.device), {"stats": stats}

        self.model.train()
        store = self._schedule(mbs, partial(self._run_model, loss_fn=loss_fn), forward_only=False)
        stats = self._dev(torch.zeros(len(_STATS), dtype=torch.float64))
        if self.is_last_stage:
            for d in store:
                stats += d["stats"]
        stats = self._dev(self._broadcast_from_last_stage(stats))
        if self.dp_size > 1:
            dist.all_reduce(stats, group=self.dp_group)
        s = dict(zip(_STATS, stats.tolist(), strict=True))
        tokens = max(s["tokens"], 1.0)
        return {
            "pg_loss": s["pg_loss"],
            "entropy": s["entropy"],
            "pg_clipfrac": s["clipfrac_sum"] / tokens,
            "pg_clipfrac_lower": s["clipfrac_lower_sum"] / tokens,
            "ppo_kl": s["kl_sum"] / tokens,
            "num_micro_batches": float(len(mbs)),
        }

    def zero_grad(self) -> None:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def grad_norm(self) -> float:
        """Global gradient norm (over TP, PP, DP) of the gradients now in the buffers."""
        self.optimizer.prepare_grads()
        return float(self.optimizer.get_grad_norm())

    def _optimizer_step(self, loss: float) -> tuple[bool, float]:
        """Step unless the loss or the gradient norm is non-finite; returns (stepped, grad_norm)."""
        norm = self.grad_norm()
        if not (math.isfinite(norm) and math.isfinite(loss)):
            self.zero_grad()
            self.consecutive_nonfinite += 1
            self.nonfinite_skips += 1
            if dist.get_rank() == 0:
                print(
                    f"[actor] non-finite loss={loss} or grad_norm={norm}: optimizer step skipped "
                    f"({self.consecutive_nonfinite} in a row)",
                    flush=True,
                )
            if self.consecutive_nonfinite >= self.cfg.max_consecutive_nonfinite:
                raise NonFiniteUpdateError(
                    f"{self.consecutive_nonfinite} consecutive optimizer steps had a non-finite loss or "
                    f"gradient norm (last: loss={loss}, grad_norm={norm}); actor.max_consecutive_nonfinite="
                    f"{self.cfg.max_consecutive_nonfinite}"
                )
            return False, norm
        self.consecutive_nonfinite = 0
        # step() recomputes the norm for clipping (one extra reduction; cheap next to fwd/bwd)
        ok, _, _ = self.optimizer.step()
        if not ok:
            raise RuntimeError("megatron optimizer reported an unsuccessful step on finite gradients")
        return True, norm

    def update(self, batch: ActorBatch) -> dict[str, float]:
        """``ppo_epochs`` passes over ``batch`` in mini-batches, one optimizer step each.

        Returns the step's metrics (means over mini-batch steps): actor/pg_loss,
        actor/pg_clipfrac, actor/pg_clipfrac_lower, actor/ppo_kl, actor/entropy,
        actor/grad_norm (pre-clipping), actor/lr, actor/nonfinite_skips,
        perf/tokens_per_s (real tokens forward+backward per second, this DP rank's share x dp)
        and the memory peaks of :func:`memory_metrics`.  The device is synchronised before the
        clock starts and before it stops: ``optimizer.step()`` returns with its kernels queued, so
        without the second sync the time (and the trainer's MFU, measured around this call) would
        miss the last step.

        ``batch.old_log_probs`` None means on-policy: the batch was sampled from the current
        weights and gets exactly one optimizer step, so the behaviour policy's log-probs are the
        forward pass's own (detached; the ratio is exactly 1) and the separate log-prob forward
        is saved. The supervised warm-up uses this; more than one step per batch is refused.

        Raises:
            NonFiniteUpdateError: after ``max_consecutive_nonfinite`` skipped steps in a row.
            ValueError: on-policy (no ``old_log_probs``) with more than one optimizer step.
        """
        self.require_resident(("params", "grads", "optimizer"), "update the policy")
        slices = self._mini_batch_slices(batch)
        if batch.old_log_probs is None and len(slices) * self.cfg.ppo_epochs != 1:
            steps = len(slices) * self.cfg.ppo_epochs
            raise ValueError(
                f"ActorBatch.old_log_probs is None (on-policy) but this update takes {len(slices)} mini-batch(es) "
                f"x {self.cfg.ppo_epochs} epoch(s) = {steps} optimizer steps: after the first the weights are no "
                "longer the behaviour policy; pass old_log_probs (compute_log_probs)"
            )
        _synchronize()  # earlier phases' queued work is not this update's
        start = time.perf_counter()
        lr = lr_at_step(self.update_count, self.cfg.optim, self.total_training_steps)
        set_lr(self.optimizer, lr)
        inject_nan = self.update_count + 1 in self.cfg.inject_nan_loss_at_steps
        rows: list[dict[str, float]] = []
        skipped = 0
        for _ in range(self.cfg.ppo_epochs):
            for idx in slices:
                self.zero_grad()
                m = self.forward_backward(batch.select(idx), inject_nan=inject_nan)
                stepped, norm = self._optimizer_step(m["pg_loss"])
                skipped += not stepped
                m["grad_norm"] = norm
                rows.append(m)
        self.update_count += 1
        _synchronize()
        elapsed = time.perf_counter() - start
        tokens = float(batch.seq_lengths.sum()) * self.cfg.ppo_epochs * self.dp_size
        metrics = {f"actor/{k}": sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "num_micro_batches"}
        metrics["actor/lr"] = lr
        metrics["actor/nonfinite_skips"] = float(skipped)
        metrics["actor/num_micro_batches"] = sum(r["num_micro_batches"] for r in rows) / len(rows)
        metrics["perf/tokens_per_s"] = tokens / max(elapsed, 1e-9)
        metrics.update(memory_metrics())
        return metrics


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def memory_metrics() -> dict[str, float]:
    """Peak memory since the previous call: one training step when called once per update.

    CUDA: verl's ``perf/max_memory_allocated_gb`` and ``perf/max_memory_reserved_gb`` (the
    caching allocator's peaks, in GiB), then the peaks are reset, so each step reports its own
    high-water mark rather than the run's.  CPU: ``perf/max_rss_gb``, the process's peak resident
    set since it started (the kernel's ``ru_maxrss`` cannot be reset).
    """
    if torch.cuda.is_available():
        out = {
            "perf/max_memory_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
            "perf/max_memory_reserved_gb": torch.cuda.max_memory_reserved() / 2**30,
        }
        torch.cuda.reset_peak_memory_stats()
        return out
    return {"perf/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
