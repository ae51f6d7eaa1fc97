"""launch/train.py with the real trainer, actor and engine, and a recording wrapper around them
(the builder wraps the parts, the trainer subclass records its own stages).

The wrapper observes and forwards: every watched call on the engine and the actor, the
lifecycle's ``empty_cache``, the checkpoint save, validation and each step's start are
appended to ``<output_dir>/events.rank<R>.txt``, one per line, then the real call runs.
tests/e2e/test_lifecycle_order.py asserts the colocated order from these files.

    torchrun --nproc-per-node 2 recording_train.py --config CONFIG [key.sub=value ...]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dapo_megatron.builder import Builder
from dapo_megatron.trainer import DapoTrainer, main

ENGINE_CALLS = (
    "generate",
    "sleep",
    "wake_up",
    "begin_weight_update",
    "finish_weight_update",
    "engine_checksums",
)
ACTOR_CALLS = ("compute_log_probs", "update", "offload", "onload")


def _describe(args, kwargs) -> str:
    parts = [v for v in list(args) + list(kwargs.values()) if isinstance(v, (int, str, tuple, list))]
    return "(" + ",".join(",".join(p) if isinstance(p, (tuple, list)) else str(p) for p in parts) + ")"


class Recording:
    """Observes and forwards the calls named in ``watch``; everything else passes through."""

    def __init__(self, target, name: str, watch: tuple[str, ...], log: list[str]) -> None:
        self.__dict__.update(_target=target, _name=name, _watch=watch, _log=log)

    def __getattr__(self, attr):
        value = getattr(self._target, attr)
        if attr not in self._watch:
            return value

        def call(*args, **kwargs):
            described = _describe(args, kwargs) if attr in ("sleep", "wake_up", "offload", "onload") else ""
            self._log.append(f"{self._name}.{attr}{described}")
            return value(*args, **kwargs)

        return call


EVENTS: list[str] = []  # one trainer per process


class RecordingBuilder(Builder):
    """The real parts, the engine and the actor wrapped in recorders."""

    def actor(self, hf_config, **kwargs):
        return Recording(super().actor(hf_config, **kwargs), "actor", ACTOR_CALLS, EVENTS)

    def lifecycle(self, actor):
        lifecycle = super().lifecycle(actor)
        lifecycle.observers.append(lambda a: EVENTS.append(a.op) if a.op == "empty_cache" else None)
        return lifecycle

    def engine(self):
        EVENTS.append("engine.built")
        return Recording(super().engine(), "engine", ENGINE_CALLS, EVENTS)


class RecordingTrainer(DapoTrainer):
    def __init__(self, cfg, parts) -> None:
        super().__init__(cfg, parts)
        self.events = EVENTS

    def _maybe_resume(self) -> bool:
        resumed = super()._maybe_resume()
        if resumed:
            self.events.append(f"trainer.resumed({self.step})")
        return resumed

    def _collect_batch(self):
        self.events.append(f"step {self.step}")
        return super()._collect_batch()

    def save_checkpoint(self, **kwargs):
        self.events.append("trainer.save_checkpoint")
        return super().save_checkpoint(**kwargs)

    def commit_checkpoint(self, pending):
        self.events.append("trainer.commit_checkpoint")
        return super().commit_checkpoint(pending)

    def _validate(self):
        self.events.append("trainer.validate")
        return super()._validate()

    def close(self) -> None:
        super().close()
        out = Path(self.cfg.trainer.output_dir)
        with open(out / f"events.rank{os.environ.get('RANK', '0')}.txt", "a") as f:
            f.write("".join(e + "\n" for e in self.events + ["closed"]))


if __name__ == "__main__":
    sys.exit(main(trainer_cls=RecordingTrainer, builder_cls=RecordingBuilder))
