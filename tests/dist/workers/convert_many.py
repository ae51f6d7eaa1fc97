"""Run many conversions in one plain process (one megatron import instead of one per model).

Usage::

    python convert_many.py hf-to-mcore --tp 2 --pp 2 HF_DIR:OUT [HF_DIR:OUT ...]
    python convert_many.py mcore-to-hf --max-shard-size 40KB CKPT:OUT:REFERENCE_HF_DIR [...]

``mcore-to-hf`` also checks that every exported tensor equals the reference HF
checkpoint's bit for bit (same names, dtypes, values) and prints ``ROUNDTRIP ok CKPT``.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import torch


def _load_all(hf_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for fn in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        out.update(load_file(fn))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["hf-to-mcore", "mcore-to-hf"])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument("jobs", nargs="+")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from dapo_megatron.conversion.hf_to_mcore import hf_to_mcore
    from dapo_megatron.conversion.mcore_to_hf import mcore_to_hf

    for job in args.jobs:
        if args.command == "hf-to-mcore":
            src, out = job.split(":")
            hf_to_mcore(src, out, tp=args.tp, pp=args.pp, progress=False)
            print(f"CONVERTED {src}", flush=True)
        else:
            ckpt, out, ref = job.split(":")
            mcore_to_hf(ckpt, out, max_shard_size=args.max_shard_size, progress=False)
            got, want = _load_all(out), _load_all(ref)
            assert sorted(got) == sorted(want), (ckpt, sorted(set(got) ^ set(want)))
            for name, t in want.items():
                assert got[name].dtype == t.dtype and torch.equal(got[name], t), (ckpt, name)
            print(f"ROUNDTRIP ok {ckpt} tensors={len(want)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
