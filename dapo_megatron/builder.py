"""Config -> the trainer's parts: the one place that names the concrete classes.

:meth:`Builder.build` runs the start-up checks in the order that fails fastest (the config,
the memory plan, the data files and the custom reward before any process group or model
exists; the checkpoint to resume from before the model is built), then builds the actor, its
lifecycle, the reward pool, the sampler, the dynamic-sampling buffer and the checkpoints, and
hands the trainer factories for the parts it builds later itself (the engine, the weight
sync, the tracker; see :mod:`dapo_megatron.parts`).

Each concrete part has a method of its own, so a subclass can wrap one without copying the
rest (tests/e2e/workers/recording_train.py records the engine's and the actor's calls).
"""

from __future__ import annotations

import logging
import math
import os
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from transformers import AutoConfig, AutoTokenizer

from dapo_megatron.actor.actor import MegatronActor
from dapo_megatron.actor.offload import empty_device_cache
from dapo_megatron.actor.parallel import init_parallel
from dapo_megatron.algo.dynamic_sampling import DynamicSamplingBuffer
from dapo_megatron.checkpoint.metadata import check_compatible, check_optimizer_layout, read_checkpoint_metadata
from dapo_megatron.checkpoint.training import ActorCheckpoints
from dapo_megatron.config import DapoConfig, data_parallel_size, to_dict, validate
from dapo_megatron.data.parquet_dataset import load_prompt_dataset
from dapo_megatron.data.sampler import ResumableSampler
from dapo_megatron.lifecycle import ColocatedLifecycle, LifecyclePlan
from dapo_megatron.observability.tracking import MetricsLogger
from dapo_megatron.parts import Parts
from dapo_megatron.planning.feasibility import Assumptions, Cluster, format_plan, make_plan, suggest
from dapo_megatron.planning.memory import load_model_shape
from dapo_megatron.resume import choose_checkpoint, log_config_diff
from dapo_megatron.reward.custom import load_file_scorer
from dapo_megatron.reward.pool import RewardPool
from dapo_megatron.rollout.engine import RolloutEngine
from dapo_megatron.rollout.vllm_engine import VllmEngine
from dapo_megatron.torch_dtypes import torch_dtype
from dapo_megatron.weight_sync.sync import EngineWeightSync

__all__ = ["Builder"]

logger = logging.getLogger(__name__)


class Builder:
    """Builds :class:`~dapo_megatron.parts.Parts` for one config on this rank (collective)."""

    def __init__(self, cfg: DapoConfig) -> None:
        self.cfg = cfg

    @property
    def ckpt_root(self) -> Path:
        return Path(self.cfg.trainer.output_dir) / "checkpoints"

    def build(self) -> Parts:
        cfg = self.cfg
        world = int(os.environ.get("WORLD_SIZE", "1"))
        validate(cfg, world_size=world, check_files=True)
        if torch.cuda.is_available():
            self.preflight()
        # Data first: a bad file should fail in seconds, before any process group or model exists.
        model_path = cfg.actor.model_path
        tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer_path or model_path)
        hf_config = AutoConfig.from_pretrained(model_path)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        load = dict(
            max_prompt_length=cfg.data.max_prompt_length,
            prompt_key=cfg.data.prompt_key,
            dedup=cfg.data.dedup_prompts,
            filter_overlong_prompts=cfg.data.filter_overlong_prompts,
            truncation=cfg.data.truncation,
            apply_chat_template=cfg.data.apply_chat_template,
        )
        train_set = load_prompt_dataset(cfg.data.train_files, tokenizer, **load)
        val_set = []
        if cfg.data.val_files:
            val = load_prompt_dataset(cfg.data.val_files, tokenizer, **load)
            limit = cfg.data.val_max_samples
            val_set = list(val) if limit < 0 else list(val)[:limit]
        custom = cfg.reward.custom_function
        # Imported now: a wrong path or name fails before any process group or model exists.
        scorer = load_file_scorer(custom.path, custom.name) if custom.path else None
        par = cfg.actor.parallel
        init_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, seed=cfg.actor.seed)
        rank = dist.get_rank()
        resume_from = self.resume_target(hf_config, rank)
        total_steps = self.total_steps(len(train_set))
        actor = self.actor(hf_config, total_steps=total_steps, pad_id=pad_id)
        return Parts(
            tokenizer=tokenizer,
            hf_config=hf_config,
            pad_id=pad_id,
            train_set=train_set,
            val_set=val_set,
            actor=actor,
            lifecycle=self.lifecycle(actor),
            pool=RewardPool.from_config(cfg.reward, scorer=scorer),
            sampler=ResumableSampler(len(train_set), seed=cfg.data.seed, shuffle=cfg.data.shuffle),
            buffer=self.buffer(),
            checkpoints=ActorCheckpoints(
                self.ckpt_root,
                actor,
                hf_config,
                keep_last=cfg.trainer.checkpoint.keep_last,
                run_config=to_dict(cfg),
            ),
            build_engine=self.engine,
            build_weight_sync=partial(self.weight_sync, actor=actor, hf_config=hf_config),
            build_tracker=self.tracker,
            total_steps=total_steps,
            rank=rank,
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=data_parallel_size(cfg, world),
            resume_from=resume_from,
        )

    # ------------------------------------------------------------ start-up checks
    def preflight(self) -> None:
        """Refuse a config whose memory estimate does not fit this GPU, before loading anything.

        CPU runs skip it: the planner models GPU memory (weights, optimizer, KV cache).
        """
        t = self.cfg.trainer
        gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        cluster = Cluster(nodes=t.nnodes, gpus_per_node=t.n_gpus_per_node, gpu_memory_gib=gib)
        shape = load_model_shape(os.path.join(self.cfg.actor.model_path, "config.json"))
        plan = make_plan(self.cfg, shape, cluster, Assumptions())
        if int(os.environ.get("RANK", "0")) == 0:
            # the table this check judged, phase by phase, as the trainer's lifecycle will run them
            logger.info("preflight:\n%s", format_plan(plan, Assumptions()))
        for warning in plan.warnings:
            logger.warning("preflight: %s", warning)
        if not plan.feasible:
            hints = suggest(self.cfg, shape, cluster, Assumptions())
            raise RuntimeError(
                "preflight plan refuses this run on "
                f"{t.nnodes} x {t.n_gpus_per_node} x {gib:.0f} GiB:\n  - "
                + "\n  - ".join(plan.problems)
                + ("\ntry: " + " | ".join(hints) if hints else "")
            )

    def resume_target(self, hf_config, rank: int) -> Path | None:
        """Choose the checkpoint to resume from and verify its files against its manifest
        (``resume=auto`` falls back past damaged ones), then refuse a checkpoint of another
        model or one whose optimizer state cannot load at this layout (only legacy
        ``dp_reshardable`` state is layout-bound), and list the settings changed since it was
        saved: all before the model, the engine or any collective load exists."""
        saving = self.cfg.trainer.checkpoint
        directory = choose_checkpoint(saving.resume, self.ckpt_root, checksums=saving.verify_checksums).directory
        if directory is not None:
            meta = read_checkpoint_metadata(directory)
            where = f"checkpoint {directory}"
            check_compatible(meta, hf_config, where=where)
            par = self.cfg.actor.parallel
            check_optimizer_layout(meta, par.tensor_model_parallel_size, par.pipeline_model_parallel_size, where=where)
            if rank == 0:
                log_config_diff(meta.get("run_config"), to_dict(self.cfg), directory)
        return directory

    def total_steps(self, train_prompts: int) -> int:
        t = self.cfg.trainer
        if t.total_training_steps is not None:
            return t.total_training_steps
        # At least one generation round per step: an epoch is at most this many steps.
        return t.total_epochs * math.ceil(train_prompts / self.cfg.data.gen_batch_size)

    # ------------------------------------------------------------ the concrete parts
    def actor(self, hf_config, *, total_steps: int, pad_id: int) -> MegatronActor:
        cfg = self.cfg
        return MegatronActor(
            cfg.actor,
            cfg.algorithm,
            hf_config,
            weights=cfg.actor.model_path,
            temperature=cfg.rollout.temperature,
            total_training_steps=total_steps,
            pad_token_id=pad_id,
        )

    def buffer(self) -> DynamicSamplingBuffer:
        cfg = self.cfg
        fg = cfg.algorithm.filter_groups
        return DynamicSamplingBuffer(
            cfg.data.train_batch_size,
            enable=fg.enable,
            metric=fg.metric,
            std_tolerance=fg.std_tolerance,
            max_num_gen_batches=fg.max_num_gen_batches,
            on_exhausted=fg.on_exhausted,
            max_carry_age=fg.max_carry_age,
        )

    def lifecycle(self, actor) -> ColocatedLifecycle:
        return ColocatedLifecycle(LifecyclePlan.from_config(self.cfg), actor, empty_device_cache)

    def engine(self) -> RolloutEngine:
        cfg = self.cfg
        return VllmEngine.from_config(
            cfg.rollout,
            cfg.actor.model_path,
            max_model_len=cfg.data.max_prompt_length + cfg.data.max_response_length,
        )

    def weight_sync(self, engine: RolloutEngine, *, actor, hf_config) -> EngineWeightSync:
        ws = self.cfg.rollout.weight_sync
        return EngineWeightSync(
            actor.model,
            hf_config,
            engine,
            dtype=torch_dtype(self.cfg.rollout.dtype),
            bucket_size_mb=ws.bucket_size_mb,
            stale_tensors=ws.inject_stale_tensors or (),
        )

    def tracker(self, resume_step: int | None) -> MetricsLogger:
        cfg = self.cfg
        return MetricsLogger(
            cfg.trainer.output_dir,
            cfg.trainer.logger,
            project=cfg.trainer.project_name,
            experiment=cfg.trainer.experiment_name,
            config=to_dict(cfg),
            resume_step=resume_step,
        )
