"""The model the converter reads and writes for: megatron's own description of the TP=1/PP=1 model.

Why megatron's description and not a table of keys: the keys, stacked-layer axes and
``_extra_state`` objects of megatron's ``sharded_state_dict`` are exactly what a real model
asks for on load, whichever megatron-core release is installed.
"""

from __future__ import annotations

import re
import sys

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from tqdm import tqdm

from dapo_megatron.actor.model import build_gpt_model
from dapo_megatron.actor.parallel import destroy_parallel, init_parallel

LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")
# vocab-parallel parameters: their rows are padded for the target TP
VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def progress_bar(iterable, *, desc: str, total: int, enabled: bool):
    return tqdm(iterable, desc=desc, total=total, unit="tensor", disable=not enabled, file=sys.stderr)


class SingleProcessGroup:
    """A 1-rank gloo world with megatron's parallel state at TP=PP=1, torn down on exit.

    ``cpu_only``: on a GPU host too, no CUDA device is selected and no NCCL communicator made.
    """

    def __enter__(self):
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                "conversion runs in a single process; call it outside torchrun "
                f"(found a world of {dist.get_world_size()} ranks)"
            )
        init_parallel(1, 1, seed=0, cpu_only=True)
        return self

    def __exit__(self, *exc):
        destroy_parallel()
        return False


def meta_sharded_state_dict(hf_config) -> dict:
    """Megatron's sharded state dict of the full (TP=1, PP=1) model, built on the meta device.

    ``cpu_init`` keeps megatron's layers from allocating on the current CUDA device (an explicit
    ``device=`` beats the meta context) and ``perform_initialization=False`` from drawing on the
    CUDA RNG tracker: conversion never touches a GPU, whatever the host has.
    """
    with torch.device("meta"):
        model = build_gpt_model(
            hf_config, tp=1, pp=1, pre_process=True, post_process=True, cpu_init=True, perform_initialization=False
        )
    return model.sharded_state_dict()


def is_tensor_entry(entry) -> bool:
    return isinstance(entry, (ShardedTensor, ShardedTensorFactory))
