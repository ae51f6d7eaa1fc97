"""Which environment settings change float32 results on this machine?

A warm-up that stops after a fixed number of steps lands wherever the machine's rounding
takes it; to emulate other machines, vary what changes the rounding. This prints a short
hash of each of a few float32 computations a tiny Qwen2 training step uses (a linear
layer, a reduction, softmax, causal attention, and an MLP after 20 Adam steps), so
running it under different settings shows which of them change which results:

    for env in "" "MKL_ENABLE_INSTRUCTIONS=AVX2" "ONEDNN_MAX_CPU_ISA=AVX2" \\
               "ATEN_CPU_CAPABILITY=avx2" "OMP_NUM_THREADS=2"; do
        echo "[$env] $(env OMP_NUM_THREADS=1 $env .venv/bin/python bench/fp_variation.py)"
    done
"""

from __future__ import annotations

import hashlib

import torch


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:6]


def main() -> None:
    torch.manual_seed(0)
    a = torch.randn(4096, 128)
    w = torch.randn(384, 128)
    x = torch.randn(8, 4, 64, 32)
    results = {
        "linear": torch.nn.functional.linear(a, w),
        "sum": a.sum(0),
        "softmax": torch.softmax(a @ a[:256].T, -1),
        "sdpa": torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True),
    }
    mlp = torch.nn.Sequential(torch.nn.Linear(128, 384), torch.nn.SiLU(), torch.nn.Linear(384, 128))
    opt = torch.optim.Adam(mlp.parameters(), lr=3e-3)
    for _ in range(20):
        loss = (mlp(a) - a).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    results["mlp_after_adam"] = torch.cat([p.detach().flatten() for p in mlp.parameters()])
    print(
        f"threads {torch.get_num_threads()} isa {torch.backends.cpu.get_cpu_capability()} "
        + " ".join(f"{k}:{_digest(v)}" for k, v in results.items())
    )


if __name__ == "__main__":
    main()
