"""The model the converter reads and writes for: megatron's own description of the TP=1/PP=1 model.

Why megatron's description and not a table of keys: the keys, stacked-layer axes and
``_extra_state`` objects of megatron's ``sharded_state_dict`` are exactly what a real model
asks for on load, whichever megatron-core release is installed.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from tqdm import tqdm

from dapo_megatron.actor.model import build_gpt_model
from dapo_megatron.actor.parallel import destroy_parallel, init_parallel

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")
# vocab-parallel parameters: their rows are padded for the target TP
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def progress_bar(iterable, *, desc: str, total: int, enabled: bool):
    return tqdm(iterable, desc=desc, total=total, unit="tensor", disable=not enabled, file=sys.stderr)


@contextlib.contextmanager
def meta_sharded_state_dict(hf_config) -> Iterator[dict]:
    """Megatron's sharded state dict of the full (TP=1, PP=1) model, built on the meta device,
    inside a 1-rank gloo world with megatron's parallel state at TP=PP=1 (torn down on exit).

    The world is ``cpu_only`` and the model ``cpu_init`` with ``perform_initialization=False``:
    no CUDA device is selected, no NCCL communicator made, megatron's layers do not allocate on
    the current CUDA device (an explicit ``device=`` beats the meta context) and draw nothing
    from the CUDA RNG tracker. Conversion never touches a GPU, whatever the host has.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            "conversion runs in a single process; call it outside torchrun "
            f"(found a world of {dist.get_world_size()} ranks)"
        )
    init_parallel(1, 1, seed=0, cpu_only=True)
    try:
        with torch.device("meta"):
            model = build_gpt_model(
                hf_config, tp=1, pp=1, pre_process=True, post_process=True, cpu_init=True, perform_initialization=False
            )
        yield model.sharded_state_dict()
    finally:
        destroy_parallel()


def is_tensor_entry(entry) -> bool:
    return isinstance(entry, (ShardedTensor, ShardedTensorFactory))


def layer_index(name: str) -> int | None:
    """The layer of a parameter megatron stacks over the layers (``decoder.layers.<i>.``), else None."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def same_shape(name: str, a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether two shapes of parameter ``name`` agree; vocab rows may differ (padded for the TP size)."""
    return a == b or (name in _VOCAB_PARAMS and a[1:] == b[1:])
