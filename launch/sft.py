"""Supervised warm-up entry point (the demo's first stage).

    torchrun --nproc-per-node 1 launch/sft.py --config configs/tiny_cpu.yaml --init-model M --out O [...]

A script rather than ``python -m dapo_megatron.sft`` for the reason in launch/train.py: the
reward workers re-import the main module, and this one imports nothing heavy at its top.
"""

import sys

if __name__ == "__main__":
    from dapo_megatron.sft import main

    sys.exit(main())
