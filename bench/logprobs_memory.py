"""Peak memory and time: vocab_parallel_logprobs_and_entropy vs naive log_softmax+gather+entropy.

Forward + backward (upstream grad 1 on both log-prob and entropy) on CPU logits
``[tokens, 151936]`` (Qwen2.5 vocabulary), TP=1, no process group.

How memory is measured, and why: ``tracemalloc`` does not see torch's allocations, and
``torch.profiler(profile_memory=True)`` reports per-op allocation events rather than a
process-level peak.  What matters operationally is the process's resident-set high-water
mark, so each variant runs in a *fresh subprocess* (no allocator caching or earlier peaks
leak between variants) and reports the kernel's VmHWM after one forward + backward minus the
RSS right after the inputs were built (VmHWM is reset there via ``/proc/self/clear_refs``, so
temporaries of building the inputs do not count).  The
delta therefore includes the logits' gradient (one ``[tokens x vocab]`` tensor, needed by
both variants) plus every temporary.  CPU torch allocates large tensors with mmap and frees
them back to the OS, so RSS tracks live tensors closely.  Time: min over ``--repeats`` runs.

Usage::

    .venv/bin/python bench/logprobs_memory.py [--tokens 256 1024] [--vocab 151936] \
        [--repeats 3] [--dtype float32] [--chunk-elems 16777216]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from dapo_megatron.actor.logprobs import DEFAULT_CHUNK_ELEMS

VARIANTS = ("naive", "ours", "ours_no_entropy")


def _hwm_mib() -> float:
    """Resident-set high-water mark (VmHWM) of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_one(variant: str, tokens: int, vocab: int, dtype: str, repeats: int, threads: int, chunk_elems: int) -> dict:
    """Runs inside the child process."""
    import torch

    from dapo_megatron.actor.logprobs import naive_logprobs_and_entropy, vocab_parallel_logprobs_and_entropy

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    logits = (3.0 * torch.randn(tokens, vocab, generator=g)).to(getattr(torch, dtype)).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), generator=g)

    def step(logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits.grad = None
        if variant == "naive":
            lp, ent = naive_logprobs_and_entropy(logits, labels, 1.0, vocab)
            (lp.sum() + ent.sum()).backward()
        elif variant == "ours":
            lp, ent = vocab_parallel_logprobs_and_entropy(logits, labels, vocab_size=vocab, chunk_elems=chunk_elems)
            (lp.sum() + ent.sum()).backward()
        else:
            lp, _ = vocab_parallel_logprobs_and_entropy(
                logits, labels, vocab_size=vocab, compute_entropy=False, chunk_elems=chunk_elems
            )
            lp.sum().backward()

    # warm-up on 2 tokens: lazy imports (megatron.core's parallel_state, ~200 MiB of modules) and
    # kernel code pages are one-time costs, not per-call memory
    step(logits[:2].detach().clone().requires_grad_(True), labels[:2])
    _reset_hwm()  # forget the temporaries of building the inputs and of the warm-up
    base = _hwm_mib()
    t0 = time.perf_counter()
    step(logits, labels)
    times = [time.perf_counter() - t0]
    peak = _hwm_mib()
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        step(logits, labels)
        times.append(time.perf_counter() - t0)
    one_copy = tokens * vocab * logits.element_size() / 2**20
    return dict(
        variant=variant,
        tokens=tokens,
        vocab=vocab,
        dtype=dtype,
        peak_delta_mib=round(peak - base, 1),
        logits_mib=round(one_copy, 1),
        time_s=round(min(times), 4),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk-elems", type=int, default=DEFAULT_CHUNK_ELEMS, help="ours: float32 scratch per chunk")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        variant, tokens = args.child.split(":")
        print(
            json.dumps(
                run_one(variant, int(tokens), args.vocab, args.dtype, args.repeats, args.threads, args.chunk_elems)
            )
        )
        return

    repo = Path(__file__).resolve().parents[1]
    print(f"{'tokens':>7} {'variant':>16} {'peak delta MiB':>15} {'x logits':>9} {'time s':>8}")
    for tokens in args.tokens:
        res = {}
        for variant in VARIANTS:
            cmd = [
                sys.executable, "-W", "ignore", str(Path(__file__).resolve()), "--child", f"{variant}:{tokens}",
                "--vocab", str(args.vocab), "--dtype", args.dtype, "--repeats", str(args.repeats),
                "--threads", str(args.threads), "--chunk-elems", str(args.chunk_elems),
            ]  # fmt: skip
            out = subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True).stdout
            r = res[variant] = json.loads(out.strip().splitlines()[-1])
            ratio = r["peak_delta_mib"] / r["logits_mib"]
            print(
                f"{tokens:>7} {variant:>16} {r['peak_delta_mib']:>15.1f} {ratio:>9.2f} {r['time_s']:>8.3f}", flush=True
            )
        n, o = res["naive"], res["ours"]
        print(
            f"{tokens:>7} ratio naive/ours: memory {n['peak_delta_mib'] / o['peak_delta_mib']:.2f}x, "
            f"time {n['time_s'] / o['time_s']:.2f}x  (one [tokens x vocab] {args.dtype} = {n['logits_mib']} MiB)",
            flush=True,
        )


if __name__ == "__main__":
    main()
