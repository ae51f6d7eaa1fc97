"""Oracle: mbridge's export of our model == our export, tensor by tensor (torchrun, 2 ranks).

Usage::

    torchrun --nproc_per_node=2 convert_mbridge_worker.py --layouts 2x1,1x2 HF_DIR:CKPT [...]

For each layout and converted checkpoint: builds our model, loads the checkpoint, and
streams both exports -- ours (:func:`dapo_megatron.actor.hf_loading.iter_hf_weights`,
gathered over PP here) and mbridge's ``export_weights`` -- comparing every tensor
bit for bit and the name sets (mbridge keeps the vocab padding rows: checked zero, then
trimmed).  mbridge hard-codes Transformer-Engine names for the two
pre-norms; a subclass translates our local-spec names before its lookup.  Prints
``MBRIDGE ok tp=.. pp=.. model=.. tensors=N`` on rank 0.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

_TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def local_spec_bridge(hf_config, pristine_direct_mapping: dict[str, str]):
    """An mbridge bridge for ``hf_config`` that understands megatron's local-spec norm names.

    mbridge 0.15.1's Qwen2/Qwen3/Llama bridges write the tied-embedding rule into the
    *class-level* ``_DIRECT_MAPPING`` dict, so after one tied model every later bridge in
    the process drops ``lm_head.weight``; each instance here gets its own copy first.
    """
    from mbridge import AutoBridge

    base = type(AutoBridge.from_config(hf_config))

    class LocalSpecBridge(base):
        def __init__(self, *args, **kwargs):
            self._DIRECT_MAPPING = dict(pristine_direct_mapping)
            super().__init__(*args, **kwargs)

        def _weight_name_mapping_mcore_to_hf(self, mcore_weights_name: str) -> list[str]:
            for local, te in _TE_NAMES.items():
                if mcore_weights_name.endswith(local):
                    mcore_weights_name = mcore_weights_name[: -len(local)] + te
            return super()._weight_name_mapping_mcore_to_hf(mcore_weights_name)

    return LocalSpecBridge(hf_config)


def our_export(model, hf_config) -> dict[str, torch.Tensor]:
    """Our streaming export, gathered over PP (every rank gets every tensor)."""
    from megatron.core import parallel_state as ps

    from dapo_megatron.actor.hf_loading import iter_hf_weights

    local = dict(iter_hf_weights(model, hf_config))
    parts = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(parts, local, group=ps.get_pipeline_model_parallel_group())
    return {k: v for part in parts for k, v in part.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", required=True)
    ap.add_argument("pairs", nargs="+")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from mbridge.core.bridge import Bridge
    from transformers import AutoConfig

    from dapo_megatron.actor.model import build_gpt_model
    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel
    from dapo_megatron.checkpoint.training import load_checkpoint

    pristine = dict(Bridge._DIRECT_MAPPING)  # before any bridge mutates it
    for spec in args.layouts.split(","):
        tp, pp = (int(x) for x in spec.split("x"))
        init_parallel(tp, pp, seed=0)
        for pair in args.pairs:
            hf_dir, ckpt = pair.split(":")
            cfg = AutoConfig.from_pretrained(hf_dir)
            model = build_gpt_model(cfg)
            load_checkpoint(ckpt, model, cfg)
            ours = our_export(model, cfg)
            theirs = dict(local_spec_bridge(cfg, pristine).export_weights([model]))
            if cfg.tie_word_embeddings and "lm_head.weight" in theirs:
                # mbridge's Llama bridge has no tied-embedding rule: at PP>1 it exports the last
                # stage's tied output copy as lm_head; it must equal the embedding
                tied = theirs.pop("lm_head.weight")
                assert torch.equal(tied, theirs["model.embed_tokens.weight"]), "tied output copy differs"
            assert sorted(ours) == sorted(theirs), sorted(set(ours) ^ set(theirs))
            for name in ("model.embed_tokens.weight", "lm_head.weight"):
                if name in theirs:  # mbridge keeps megatron's padded vocab rows; they must be zero
                    pad = theirs[name][cfg.vocab_size :]
                    assert torch.count_nonzero(pad) == 0, (name, tuple(pad.shape))
                    theirs[name] = theirs[name][: cfg.vocab_size]
            bad = [
                (n, tuple(ours[n].shape), tuple(theirs[n].shape))
                for n in ours
                if not torch.equal(ours[n], theirs[n].to(ours[n].dtype))
            ]
            assert not bad, bad
            if dist.get_rank() == 0:
                print(f"MBRIDGE ok tp={tp} pp={pp} model={os.path.basename(hf_dir)} tensors={len(ours)}", flush=True)
        destroy_parallel(destroy_process_group=False)
    dist.barrier()
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
