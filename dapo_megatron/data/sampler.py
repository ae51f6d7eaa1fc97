"""An epoch-aware stream of prompt indices that resumes exactly.

Why not a torch DataLoader: DAPO's dynamic sampling draws a variable number
of generation batches per training step, so "the loader position" is not a
function of the step count. Resume bugs in existing trainers (skipped or
repeated prompts) come from reconstructing it that way. Here the position is
explicit state, and each epoch's permutation is a pure function of
(seed, epoch), independent of any global RNG another component may consume.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ResumableSampler:
    """Yields batches of indices in ``range(num_items)``, epoch after epoch.

    A batch that crosses the end of an epoch is completed from the start of the next
    epoch's permutation, so no index is skipped or repeated within an epoch.
    """

    def __init__(self, num_items: int, *, seed: int, shuffle: bool = True) -> None:
        if num_items <= 0:
            raise ValueError(f"num_items must be positive, got {num_items}")
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = 0
        self._position = 0
        self._order = self._permutation(0)

    @property
    def epoch(self) -> int:
        """Epochs completed so far; the current batch is drawn from this one."""
        return self._epoch

    @property
    def position(self) -> int:
        """Indices already consumed from the current epoch's permutation."""
        return self._position

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_items)
        # SeedSequence mixes (seed, epoch) so seed=1/epoch=0 and
        # seed=0/epoch=1 give unrelated orders (a plain seed+epoch would not).
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        return rng.permutation(self.num_items)

    def _start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._position = 0
        self._order = self._permutation(epoch)

    def next_batch(self, batch_size: int) -> list[int]:
        """Return the next ``batch_size`` indices and advance the state."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        batch: list[int] = []
        while len(batch) < batch_size:
            take = min(batch_size - len(batch), self.num_items - self._position)
            batch.extend(int(i) for i in self._order[self._position : self._position + take])
            self._position += take
            if self._position == self.num_items:
                self._start_epoch(self._epoch + 1)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and bools only, so the state survives any checkpoint format."""
        return {
            "num_items": self.num_items,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self._epoch,
            "position": self._position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a state from a different data stream.

        A changed dataset size, seed or shuffle flag would make "position"
        point into a different order, silently skipping and repeating
        prompts, so those must match.
        """
        for key in ("num_items", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state mismatch: checkpoint has {key}={state[key]!r}, "
                    f"this sampler has {key}={getattr(self, key)!r}"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_items:
            raise ValueError(f"invalid sampler state: epoch={epoch}, position={position}")
        self._start_epoch(epoch)
        self._position = position
