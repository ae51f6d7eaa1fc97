"""Conversion on a host that reports a GPU: nothing may touch it (``convert_many.py`` under guards).

Usage::

    python convert_gpu_host.py hf-to-mcore|mcore-to-hf [convert_many.py arguments]

Before converting, this process pretends CUDA is available (``torch.cuda.is_available`` returns
True, one device) and makes every entry point that would select, initialise or allocate on a GPU
raise, naming itself: ``torch.cuda.set_device``/``current_device``/``_lazy_init``/``get_rng_state``/
``synchronize`` and ``Tensor.cuda``. A process group must be gloo alone. Every model the converter
builds is recorded: all its parameters must be on the meta device. Prints
``NO_GPU_TOUCHED models=N backends=[...]`` at the end.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def _forbid(name: str):
    def touched(*args, **kwargs):
        raise RuntimeError(f"conversion touched the GPU: {name}")

    return touched


def main() -> int:
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    for name in ("set_device", "current_device", "_lazy_init", "init", "get_rng_state", "set_rng_state", "synchronize"):
        setattr(torch.cuda, name, _forbid(f"torch.cuda.{name}"))
    torch.Tensor.cuda = _forbid("Tensor.cuda")

    backends: list[str] = []
    real_init = dist.init_process_group

    def init_process_group(*args, **kwargs):
        backends.append(kwargs.get("backend") or (args[0] if args else None))
        if backends[-1] != "gloo":
            raise RuntimeError(f"conversion asked for backend {backends[-1]!r}")
        return real_init(*args, **kwargs)

    dist.init_process_group = init_process_group

    from dapo_megatron.actor import model as model_module

    built: list[set[str]] = []
    real_build = model_module.build_gpt_model

    def build_gpt_model(*args, **kwargs):
        model = real_build(*args, **kwargs)
        built.append({p.device.type for p in model.parameters()})
        return model

    model_module.build_gpt_model = build_gpt_model

    import convert_many

    rc = convert_many.main(sys.argv[1:])
    assert built and all(devices == {"meta"} for devices in built), built
    print(f"NO_GPU_TOUCHED models={len(built)} backends={backends}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
