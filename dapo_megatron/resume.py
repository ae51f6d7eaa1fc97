"""Which checkpoint a run resumes from, and what changed in its configuration since.

Why a fallback for ``resume=auto`` only: ``auto`` asks for "the newest checkpoint that
works", so a damaged newest one (a shard truncated by a full disk, a node lost mid-copy) is
skipped, loudly, for the newest intact one: a 128-GPU allocation is not lost finding that
out.  A checkpoint named explicitly is what the user chose; loading a different one
silently would be worse than stopping, so a damaged one is an error.  Skipped checkpoints
are renamed ``damaged-step_N``, not deleted: the resumed run saves ``step_N`` again, and
the damaged files are the evidence of what went wrong.

Why a configuration diff: the sampler position and the dynamic-sampling buffer in a
checkpoint are indices into a training set, counts of prompts and groups of ``rollout.n``
responses.  Change the data, the batch sizes or ``rollout.n`` and they still load but mean
something else, so such changes are listed as warnings (key, old -> new).  Another model is
refused by :func:`~dapo_megatron.checkpoint.metadata.check_compatible`.  Everything else (the
learning rate, the number of steps, logging) may change freely; it is listed at INFO level.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapo_megatron.checkpoint.layout import complete_checkpoints
from dapo_megatron.checkpoint.training import set_aside_damaged
from dapo_megatron.checkpoint.verify import CheckpointIntegrityError, Verification, verify_checkpoint
from dapo_megatron.distributed import this_rank

__all__ = [
    "WARN_ON_CHANGE",
    "ConfigChange",
    "ConfigDiff",
    "ResumeChoice",
    "Skipped",
    "choose_checkpoint",
    "diff_configs",
    "log_config_diff",
]

logger = logging.getLogger(__name__)

# Settings that change what a checkpoint's sampler / dynamic-sampling state means: which
# prompts are in the training set and in which order, how many make a round or a step,
# how many responses make a group.  The model and tokenizer paths are here too: a different
# model is refused by its identity (check_compatible), a different path to the same one is not.
WARN_ON_CHANGE = (
    "data.train_files",
    "data.tokenizer_path",
    "data.prompt_key",
    "data.max_prompt_length",
    "data.filter_overlong_prompts",
    "data.truncation",
    "data.dedup_prompts",
    "data.shuffle",
    "data.seed",
    "data.gen_batch_size",
    "data.train_batch_size",
    "actor.model_path",
    "actor.ppo_mini_batch_size",
    "rollout.n",
)
_ABSENT = "(not set)"


@dataclass(frozen=True)
class Skipped:
    directory: Path  # where it was
    moved_to: Path | None  # where it is now (rank 0 knows)
    reason: str


@dataclass(frozen=True)
class ResumeChoice:
    directory: Path | None  # None: start from the initial model
    verification: Verification | None = None
    skipped: tuple[Skipped, ...] = ()


@dataclass(frozen=True)
class ConfigChange:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


@dataclass(frozen=True)
class ConfigDiff:
    warned: tuple[ConfigChange, ...]  # keys in WARN_ON_CHANGE
    free: tuple[ConfigChange, ...]  # everything else


def choose_checkpoint(mode: str, root: str | Path, *, checksums: bool) -> ResumeChoice:
    """The checkpoint to resume from for ``trainer.checkpoint.resume=mode``; collective.

    ``auto``: the newest intact checkpoint under ``root`` (damaged newer ones are skipped,
    set aside and named in a warning); ``disable``: none; anything else: that path, which
    must be intact.  Checkpoints without a manifest (earlier versions) are accepted
    unverified, with a warning.

    Raises:
        CheckpointIntegrityError: the named checkpoint is damaged, or (``auto``) every
            checkpoint under ``root`` is (nothing is renamed then).
        FileNotFoundError: the named path holds no checkpoint.
    """
    if mode == "disable":
        return ResumeChoice(None)
    if mode != "auto":
        verification = verify_checkpoint(Path(mode), checksums=checksums)
        if not verification.intact:
            raise CheckpointIntegrityError(
                f"{verification.error()}. It is named by trainer.checkpoint.resume, so it is not replaced "
                "by another one; name an intact checkpoint, or use resume=auto for the newest intact one"
            )
        verification.warn_if_unverified("resuming from")
        return ResumeChoice(verification.directory, verification)
    root = Path(root)
    damaged: list[Verification] = []
    chosen = None
    for directory in reversed(complete_checkpoints(root)):
        verification = verify_checkpoint(directory, checksums=checksums)
        if verification.intact:
            chosen = verification
            break
        damaged.append(verification)
    if chosen is None:
        if damaged:
            reasons = "\n  - ".join(str(v.error()) for v in damaged)
            raise CheckpointIntegrityError(
                f"resume=auto: every checkpoint under {root} is damaged (nothing was renamed or deleted):\n  - "
                f"{reasons}\nrepair or remove them, or set trainer.checkpoint.resume=disable to start over"
            )
        return ResumeChoice(None)
    skipped: tuple[Skipped, ...] = ()
    if damaged:
        moved = set_aside_damaged(root, [v.directory for v in damaged], chosen.directory)
        skipped = tuple(
            Skipped(v.directory, moved[i] if i < len(moved) else None, v.reason()) for i, v in enumerate(damaged)
        )
        if this_rank() == 0:
            for s in skipped:
                logger.warning(
                    "CHECKPOINT SKIPPED: %s is damaged (%s); renamed to %s; resume=auto falls back to %s",
                    s.directory,
                    s.reason,
                    s.moved_to.name if s.moved_to else "?",
                    chosen.directory.name,
                )
    chosen.warn_if_unverified("resuming from")
    return ResumeChoice(chosen.directory, chosen, skipped)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def diff_configs(saved: Mapping[str, Any], current: Mapping[str, Any]) -> ConfigDiff:
    """Every leaf key whose value differs between two configuration trees (``to_dict`` form)."""
    old, new = _flatten(saved), _flatten(current)
    warned, free = [], []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a != b:
            (warned if key in WARN_ON_CHANGE else free).append(ConfigChange(key, a, b))
    return ConfigDiff(tuple(warned), tuple(free))


def log_config_diff(saved: Mapping[str, Any] | None, current: Mapping[str, Any], directory: Path) -> ConfigDiff | None:
    """Log what changed since ``directory`` was saved (call on the logging rank); None if it holds no config."""
    if saved is None:
        logger.info("checkpoint %s holds no configuration (an earlier version): changes cannot be listed", directory)
        return None
    diff = diff_configs(saved, current)
    if diff.warned:
        logger.warning(
            "resuming from %s with settings that change what its sampler and dynamic-sampling state mean:\n  %s",
            directory,
            "\n  ".join(map(str, diff.warned)),
        )
    if diff.free:
        logger.info("settings changed since %s (allowed): %s", directory.name, "; ".join(map(str, diff.free)))
    return diff
