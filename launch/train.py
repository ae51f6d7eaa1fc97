"""DAPO training entry point.

    torchrun --nproc-per-node 2 launch/train.py --config configs/tiny_cpu.yaml [key.sub=value ...]

Multi-node: the same command under ``torchrun --nnodes N --rdzv-endpoint HOST:PORT``
(slurm/launch.sh does this on a Slurm allocation).
"""

import sys

from dapo_megatron.trainer import main

if __name__ == "__main__":
    sys.exit(main())
