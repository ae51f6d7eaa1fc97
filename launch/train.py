"""DAPO training entry point.

    torchrun --nproc-per-node 2 launch/train.py --config configs/tiny_cpu.yaml [key.sub=value ...]

Multi-node: the same command under ``torchrun --nnodes N --rdzv-endpoint HOST:PORT``
(slurm/launch.sh does this on a Slurm allocation).
"""

import sys

if __name__ == "__main__":
    # Under the main guard: multiprocessing's reward workers (fork server) re-import this
    # script as __mp_main__, and the trainer's imports (torch, megatron-core, vLLM) would
    # cost each of them seconds and half a GB.
    from dapo_megatron.trainer import main

    sys.exit(main())
