"""HF <-> Megatron (torch_dist) checkpoint conversion CLI.

::

    python -m dapo_megatron.convert hf-to-mcore --hf-dir HF --out DIR --tp 2 --pp 2
    python -m dapo_megatron.convert mcore-to-hf --ckpt DIR --out HF [--hf-config-from HF] [--max-shard-size 5GB]

(also installed as ``dapo-convert``).  The library is :mod:`dapo_megatron.conversion`.
"""

from __future__ import annotations

import argparse
import sys

from dapo_megatron.checkpoint.metadata import CheckpointMismatchError
from dapo_megatron.conversion.hf_to_mcore import hf_to_mcore
from dapo_megatron.conversion.mcore_to_hf import mcore_to_hf
from dapo_megatron.conversion.validation import ConversionError
from dapo_megatron.dtypes import DTYPES


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dapo-convert", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors -> torch_dist checkpoint")
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--tp", type=int, default=1, help="target tensor-parallel size (validation + vocab padding)")
    a.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size (validation)")
    a.add_argument("--no-progress", action="store_true")
    b = sub.add_parser("mcore-to-hf", help="torch_dist checkpoint -> HF safetensors")
    b.add_argument("--ckpt", required=True, help="checkpoint directory, or a root with 'latest'")
    b.add_argument("--out", required=True)
    b.add_argument("--hf-config-from", default=None, help="HF dir to take config.json and tokenizer files from")
    b.add_argument("--max-shard-size", default="5GB")
    b.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    b.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 0 on success, 2 on invalid input (message on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "hf-to-mcore":
            path = hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp, progress=not args.no_progress)
        else:
            path = mcore_to_hf(
                args.ckpt,
                args.out,
                hf_config_from=args.hf_config_from,
                max_shard_size=args.max_shard_size,
                dtype=args.dtype,
                progress=not args.no_progress,
            )
    except (ConversionError, CheckpointMismatchError, FileExistsError) as e:
        print(f"dapo-convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
