"""``sft.export_hf`` writes the actor as an HF checkpoint: the loaded weights back bit for bit,
readable by transformers, with ``warmup.json``, replacing what the output directory held.

Usage: ``torchrun --nproc_per_node=2 sft_export_worker.py OUT_ROOT HF_DIR [HF_DIR ...]`` (TP2:
the export gathers the shards, rank 0 writes); rank 0 prints ``EXPORT ok NAME`` per model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from dapo_megatron.actor.actor import MegatronActor
from dapo_megatron.actor.parallel import destroy_parallel, init_parallel
from dapo_megatron.config import ActorConfig, AlgorithmConfig
from dapo_megatron.sft import export_hf


class _Tokenizer:
    def save_pretrained(self, directory) -> None:
        (Path(directory) / "tokenizer_config.json").write_text("{}")


def main(out_root: Path, hf_dirs: list[str]) -> None:
    init_parallel(2, 1, seed=1)
    cfg = ActorConfig()
    cfg.parallel.tensor_model_parallel_size = 2
    cfg.params_dtype = "float32"
    for hf_dir in hf_dirs:
        hf_config = AutoConfig.from_pretrained(hf_dir)
        actor = MegatronActor(cfg, AlgorithmConfig(), hf_config, weights=hf_dir)
        out = out_root / Path(hf_dir).name
        if dist.get_rank() == 0:
            out.mkdir(parents=True)
            (out / "stale.txt").write_text("a previous export")
        export_hf(actor, hf_config, _Tokenizer(), out, {"steps": 3})
        if dist.get_rank() == 0:
            files = sorted(p.name for p in out.iterdir())
            assert files == ["config.json", "model.safetensors", "tokenizer_config.json", "warmup.json"], files
            assert not out.with_name(out.name + ".tmp").exists()
            got, want = load_file(str(out / "model.safetensors")), load_file(str(Path(hf_dir) / "model.safetensors"))
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), sorted(got)
            AutoModelForCausalLM.from_pretrained(out)
            assert json.loads((out / "warmup.json").read_text()) == {"steps": 3}
            print(f"EXPORT ok {out.name}", flush=True)
        dist.barrier()
    destroy_parallel()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
