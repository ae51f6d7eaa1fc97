"""Peak memory of the conversion CLI vs the size of the model converted.

    python bench/convert_memory.py [--hidden 1024 --layers 8 --vocab 32000 --ffn 2816 --dtype bfloat16]

Builds a random HF Qwen2 model (a few hundred MB), then runs each direction in a fresh
child process that first imports everything (fixed cost, not counted) and then samples its
RSS every 5 ms during the conversion (psutil; writer child processes reported separately):

* baseline: the RSS after imports + the 1-rank process group + the meta-device model,
* ``hf-to-mcore --tp 2 --pp 2``,
* ``mcore-to-hf --max-shard-size 100MB``.

Reported: peak RSS and peak anonymous RSS (without file-backed pages such as the mapped
safetensors), minus their values at the start, relative to the model size and to the
largest tensor.  Expectation from the design: both directions stream one parameter of
one layer at a time, so the extra memory is a small multiple of the largest tensor and
does not grow with the number of layers (compare ``--layers 24``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, threading, time, warnings
warnings.filterwarnings("ignore")
import psutil, torch, transformers
import megatron.core.dist_checkpointing  # noqa: F401  (import cost is not conversion cost)
from dapo_megatron.conversion.meta_model import meta_sharded_state_dict
from dapo_megatron.convert import main

mode, args = sys.argv[1], sys.argv[2:]
me = psutil.Process()
if mode == "baseline":  # warm the fixed costs once, then measure from here
    with meta_sharded_state_dict(transformers.AutoConfig.from_pretrained(args[0])):
        pass

def anon_bytes():  # private memory only: RSS minus file-backed pages (mmap'd safetensors, libraries)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")

rss0, anon0 = me.memory_info().rss, anon_bytes()
peak = {"self": rss0, "anon": anon0, "tree": rss0}
stop = threading.Event()

def sample():
    while not stop.is_set():
        own = me.memory_info().rss
        kids = 0
        for c in me.children(recursive=True):
            try:
                kids += c.memory_info().rss
            except psutil.Error:
                pass
        peak["self"] = max(peak["self"], own)
        peak["anon"] = max(peak["anon"], anon_bytes())
        peak["tree"] = max(peak["tree"], own + kids)
        time.sleep(0.005)

t = threading.Thread(target=sample, daemon=True)
t.start()
if mode != "baseline":
    assert main([mode, *args, "--no-progress"]) == 0
stop.set()
t.join()
mb = 2**20
print(json.dumps({
    "start_mb": rss0 / mb, "peak_mb": peak["self"] / mb, "tree_peak_mb": peak["tree"] / mb,
    "anon_start_mb": anon0 / mb, "anon_peak_mb": peak["anon"] / mb,
}))
"""


def run_child(*args: str) -> dict:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))  # keep e.g. /tmp/mc19
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()

    import torch
    import transformers

    dtype = getattr(torch, args.dtype)
    cfg = transformers.Qwen2Config(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=args.ffn,
        vocab_size=args.vocab,
        tie_word_embeddings=False,
        dtype=args.dtype,
    )
    with tempfile.TemporaryDirectory(prefix="convert_mem_") as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = transformers.Qwen2ForCausalLM(cfg).to(dtype)
        model.save_pretrained(tmp / "hf")
        sizes = [p.numel() * p.element_size() for p in model.parameters()]
        model_mb, largest_mb = sum(sizes) / 2**20, max(sizes) / 2**20
        del model

        base = run_child("baseline", str(tmp / "hf"))
        h2m = run_child(
            "hf-to-mcore", "--hf-dir", str(tmp / "hf"), "--out", str(tmp / "mcore"), "--tp", "2", "--pp", "2"
        )
        m2h = run_child(
            "mcore-to-hf", "--ckpt", str(tmp / "mcore"), "--out", str(tmp / "back"), "--max-shard-size", "100MB"
        )

    print(
        f"model: hidden={args.hidden} layers={args.layers} vocab={args.vocab} ffn={args.ffn} {args.dtype}: "
        f"{model_mb:.0f} MiB, largest tensor {largest_mb:.0f} MiB"
    )
    print(f"RSS after imports + process group + meta model: {base['start_mb']:.0f} MiB")
    print("| direction | what | at start MiB | peak MiB | peak - start MiB | / model size | / largest tensor |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("hf-to-mcore (tp2 pp2)", h2m), ("mcore-to-hf (100MB shards)", m2h)):
        for what, start, peak in (
            ("RSS", r["start_mb"], r["peak_mb"]),
            ("anonymous (RSS without file pages)", r["anon_start_mb"], r["anon_peak_mb"]),
        ):
            extra = peak - start
            print(
                f"| {name} | {what} | {start:.0f} | {peak:.0f} | {extra:.0f} | {extra / model_mb:.2f} | "
                f"{extra / largest_mb:.1f} |"
            )
        if r["tree_peak_mb"] > r["peak_mb"] + 1:
            print(f"| {name} | RSS incl. writer child processes | | {r['tree_peak_mb']:.0f} | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
