"""One short run that turns a GPU into measured numbers for the GPU-only code paths.

::

    python scripts/gpu_check.py --out "$OUT"            # on one GPU, a few minutes
    python scripts/gpu_check.py --cpu --out /tmp/check  # CPU dry run, tiny sizes (part of `make test`)

Every check appends one JSON line to ``OUT/gpu_check.jsonl`` (and prints it); each number is
given with the bound it is compared against, measured in the same run (``bounds``: a
device-to-device copy, a pinned host-to-device copy, a dense matmul).  A check that raises is
recorded with its traceback and the script exits 1 after the remaining checks ran.

Checks (sizes: a Qwen2.5-0.5B-shaped random model on a GPU, a tiny one with ``--cpu``):

``bounds``        copy GB/s (device), host-link GB/s (pinned H2D; GPU only), matmul TFLOP/s.
``backend``       the default process group's backend (``cpu:gloo,cuda:nccl`` with CUDA) and the
                  collective helpers on it.
``hf_parity``     Megatron actor logits vs transformers' on the same random weights: fp32 with TF32
                  off, and bf16 (GPU only).
``update``        old log-probs and one DAPO update (distributed optimizer): tokens/s, MFU against
                  the measured matmul bound and against ``--peak-tflops``, peak memory against the
                  planner's train-phase estimate for the same shape; ``update_larger`` repeats it
                  on a Qwen2.5-1.5B-shaped model.
``logprobs``      the chunked log-prob/entropy kernel against naive ``log_softmax`` on a
                  16k x 152k bf16 problem (GPU; small on CPU): peak extra memory and time.
``offload``       the actor's params, grads and optimizer state to host memory and back (the
                  colocated lifecycle): ``torch.cuda.memory_allocated`` must drop by the bytes
                  moved, the round trip's GB/s against the pinned host-link bound, and the
                  weights must come back bit-exact.
``checkpoint``    save and load of model + optimizer state: seconds, GB/s, bit-exact reload.
``weight_sync``   the HF-ordered gather into preallocated buffers and the chunked checksum: GB/s
                  against the device copy bound.
``convert``       HF -> Megatron conversion in a child process on this host: CUDA must never be
                  initialised (``torch.cuda.is_initialized()`` stays False).

On the GPU machine (Python 3.12, torch with CUDA, transformers and safetensors installed; no
megatron-core, no omegaconf), bring the two missing wheels, downloaded on a networked machine::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1 omegaconf==2.4.0

and run from the repository root (within 8 minutes on one H200)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD timeout 480 python3 scripts/gpu_check.py --out "$OUT"

Not checked here: TransformerEngine and vLLM (CUDA) are too large to carry to the GPU machine,
so the actor runs the local layer spec (``actor.transformer_impl=local``) and there is no rollout
engine; NCCL with more than one rank needs more than one GPU.  Offload/onload belongs to the
colocated-lifecycle work and is not measured yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Sizes:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    seqs: int  # sequences in the update batch
    seq_len: int
    copy_bytes: int
    matmul_n: int
    logprob_tokens: int
    logprob_vocab: int


# Qwen2.5-0.5B's shape (tied embeddings), a batch of 16 x 1024 tokens
GPU_SIZES = Sizes(896, 24, 14, 2, 4864, 151936, 16, 1024, 1 << 30, 8192, 16384, 152064)
# Qwen2.5-1.5B's shape, for the second update check
GPU_SIZES_1_5B = dataclasses.replace(GPU_SIZES, hidden=1536, layers=28, heads=12, ffn=8960)
CPU_SIZES = Sizes(64, 2, 4, 2, 128, 512, 4, 48, 16 << 20, 256, 256, 4096)
CPU_SIZES_LARGER = dataclasses.replace(CPU_SIZES, hidden=96, layers=3, ffn=192)


class Report:
    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "gpu_check.jsonl"
        self.failed: list[str] = []
        self.results: dict[str, dict] = {}

    def run(self, name: str, fn: Callable[[], dict]) -> dict | None:
        t0 = time.perf_counter()
        try:
            row = {"check": name, "ok": True, **fn()}
        except Exception:  # recorded, printed and turned into exit code 1 after the other checks
            row = {"check": name, "ok": False, "error": traceback.format_exc()}
            self.failed.append(name)
        row["seconds"] = round(time.perf_counter() - t0, 3)
        self.results[name] = row
        line = json.dumps(row, sort_keys=True)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        return row if row["ok"] else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], device: torch.device, repeat: int = 3) -> float:
    """Best of ``repeat`` wall times of ``fn`` (after one warm-up), device synchronised."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def check_bounds(device: torch.device, sizes: Sizes) -> dict:
    n = sizes.copy_bytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy_gbps = sizes.copy_bytes / _timed(lambda: dst.copy_(src), device) / 1e9
    host_gbps = None
    if device.type == "cuda":
        host = torch.empty(n, pin_memory=True)
        host_gbps = sizes.copy_bytes / _timed(lambda: dst.copy_(host, non_blocking=True), device) / 1e9
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(sizes.matmul_n, sizes.matmul_n, device=device, dtype=dtype)
    b = torch.randn_like(a)
    tflops = 2 * sizes.matmul_n**3 / _timed(lambda: a @ b, device) / 1e12
    return {"copy_gbps": copy_gbps, "host_link_gbps": host_gbps, "matmul_tflops": tflops, "matmul_dtype": str(dtype)}


def check_backend() -> dict:
    import torch.distributed as dist

    from dapo_megatron.actor.parallel import init_parallel
    from dapo_megatron.distributed import all_sum, any_true, default_backend

    init_parallel(1, 1, seed=0)
    config = dist.get_backend_config()
    want = default_backend(torch.cuda.is_available())
    if not torch.cuda.is_available():
        want = "cpu:gloo,cuda:gloo"  # how torch spells plain gloo
    if config != want:
        raise AssertionError(f"default group backend {config!r}, expected {want!r}")
    if all_sum([1.5, 2.0]) != [1.5, 2.0] or any_true(False) or not any_true(True):
        raise AssertionError("collective helpers gave wrong values on one rank")
    return {"backend": config}


def _hf_model(sizes: Sizes, seed: int = 0):
    import transformers

    cfg = transformers.Qwen2Config(
        hidden_size=sizes.hidden,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.kv_heads,
        intermediate_size=sizes.ffn,
        vocab_size=sizes.vocab,
        max_position_embeddings=max(4096, sizes.seq_len),
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    )
    cfg.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    return cfg, model


def check_hf_parity(device: torch.device, sizes: Sizes) -> dict:
    from dapo_megatron.actor.hf_loading import load_hf_weights_into_model
    from dapo_megatron.actor.model import build_gpt_model

    cfg, hf = _hf_model(sizes)
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    tokens = torch.randint(0, sizes.vocab, (2, min(256, sizes.seq_len)), generator=torch.Generator().manual_seed(1))
    out = {}
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    for dtype in dtypes:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        model = build_gpt_model(cfg, params_dtype=dtype, transformer_impl="local")
        load_hf_weights_into_model(model, state, cfg)
        model.eval()
        ids = tokens.to(device)
        pos = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=pos, attention_mask=None)[..., : sizes.vocab].float()
            ref = hf.to(device=device, dtype=dtype)(input_ids=ids).logits.float()
        diff = (logits - ref).abs().max().item()
        scale = ref.abs().max().item()
        tol = 1e-4 if dtype == torch.float32 else 0.25  # bf16: catches garbage, not rounding
        if not diff <= tol * max(scale, 1.0):
            raise AssertionError(f"{dtype}: max |megatron - hf| logits = {diff:.3e} (scale {scale:.2f})")
        out[f"max_abs_diff_{str(dtype).split('.')[-1]}"] = diff
        hf.float().cpu()
        del model
    return out


def _actor(sizes: Sizes, device: torch.device, cfg_hf, state):
    from dapo_megatron.actor.actor import MegatronActor
    from dapo_megatron.config import ActorConfig, AlgorithmConfig

    a = ActorConfig()
    a.params_dtype = "bfloat16" if device.type == "cuda" else "float32"
    a.transformer_impl = "local"
    a.ppo_mini_batch_size = 1
    a.max_tokens_per_micro_batch = 16 * sizes.seq_len
    a.optim.lr = 1e-6
    a.optim.lr_warmup_steps = 0
    return MegatronActor(a, AlgorithmConfig(), cfg_hf, weights=state, temperature=1.0)


def _batch(sizes: Sizes):
    from dapo_megatron.contract import ActorBatch

    g = torch.Generator().manual_seed(2)
    n, s = sizes.seqs, sizes.seq_len
    prompt = s // 4
    return ActorBatch(
        input_ids=torch.randint(0, sizes.vocab, (n, s), generator=g),
        seq_lengths=torch.full((n,), s, dtype=torch.long),
        prompt_lengths=torch.full((n,), prompt, dtype=torch.long),
        response_mask=torch.ones(n, s - prompt),
        group_size=n,
    )


def check_update(device: torch.device, sizes: Sizes, bounds: dict | None, peak_tflops: float, state_box: dict) -> dict:
    from dapo_megatron.config import DapoConfig
    from dapo_megatron.planning.memory import estimate_memory, model_shape_from_hf, model_training_flops

    cfg_hf, hf = _hf_model(sizes)
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    del hf
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    actor = _actor(sizes, device, cfg_hf, state)
    batch = _batch(sizes)
    tokens = int(batch.seq_lengths.sum())
    _sync(device)
    t0 = time.perf_counter()
    old, _ = actor.compute_log_probs(batch, compute_entropy=False)
    _sync(device)
    logprob_s = time.perf_counter() - t0
    batch = dataclasses.replace(
        batch,
        old_log_probs=old,
        advantages=torch.randn(batch.num_sequences, generator=torch.Generator().manual_seed(3)),
    )
    actor.update(batch)  # warm-up: optimizer state is allocated on the first step
    t0 = time.perf_counter()
    metrics = actor.update(batch)
    update_s = time.perf_counter() - t0
    shape = model_shape_from_hf(cfg_hf)
    flops = model_training_flops(shape, batch.seq_lengths.tolist())
    achieved = flops / update_s / 1e12
    out = {
        "params": shape.total_params(),
        "tokens": tokens,
        "old_logprob_tokens_per_s": tokens / logprob_s,
        "update_tokens_per_s": tokens / update_s,
        "update_tflops": achieved,
        "grad_norm": metrics["actor/grad_norm"],
    }
    if bounds:
        out["mfu_vs_measured_matmul"] = achieved / bounds["matmul_tflops"]
    # the planner's train phase for this shape and batch (engine asleep, so no vLLM share)
    cfg = DapoConfig()
    cfg.actor.params_dtype = actor.cfg.params_dtype
    cfg.actor.max_tokens_per_micro_batch = actor.cfg.max_tokens_per_micro_batch
    cfg.data.max_prompt_length = sizes.seq_len // 4
    cfg.data.max_response_length = sizes.seq_len - sizes.seq_len // 4
    total = torch.cuda.get_device_properties(0).total_memory if device.type == "cuda" else 80 * 2**30
    train = estimate_memory(cfg, shape, world_size=1, gpu_bytes=total, reserve_bytes=0).phase("train")
    estimate = sum(v for k, v in train.items.items() if not k.startswith("vLLM"))
    out["planner_train_gib"] = estimate / 2**30
    if device.type == "cuda":
        out["mfu_vs_peak"] = achieved / peak_tflops
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_over_planner"] = torch.cuda.max_memory_allocated() / estimate
    state_box["actor"], state_box["hf_config"] = actor, cfg_hf
    return out


def check_logprobs(device: torch.device, sizes: Sizes) -> dict:
    from dapo_megatron.actor.logprobs import vocab_parallel_logprobs_and_entropy

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(4)
    logits = torch.randn(1, sizes.logprob_tokens, sizes.logprob_vocab, device=device, dtype=dtype, generator=g)
    labels = torch.randint(0, sizes.logprob_vocab, (1, sizes.logprob_tokens), device=device, generator=g)

    def kernel():
        return vocab_parallel_logprobs_and_entropy(logits, labels, temperature=1.0)

    def naive():
        logp = torch.log_softmax(logits.float(), dim=-1)
        return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)

    out = {"tokens": sizes.logprob_tokens, "vocab": sizes.logprob_vocab, "dtype": str(dtype)}
    results = {}
    for name, fn in (("kernel", kernel), ("naive", naive)):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with torch.no_grad():
            results[name] = fn()
            seconds = _timed(fn, device)
        out[f"{name}_seconds"] = seconds
        if device.type == "cuda":
            out[f"{name}_peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    lp_diff = (results["kernel"][0].float() - results["naive"][0]).abs().max().item()
    ent_diff = (results["kernel"][1].float() - results["naive"][1]).abs().max().item()
    if not (lp_diff < 1e-2 and ent_diff < 1e-2):
        raise AssertionError(f"kernel vs naive: log-prob diff {lp_diff:.3e}, entropy diff {ent_diff:.3e}")
    out.update(logprob_max_diff=lp_diff, entropy_max_diff=ent_diff)
    return out


def check_offload(device: torch.device, state_box: dict, bounds: dict | None) -> dict:
    from dapo_megatron.config import OFFLOAD_KINDS

    actor = state_box["actor"]
    want = [p.detach().clone() for p in actor.gpt.parameters()]
    out: dict = {}
    for kinds in [(k,) for k in OFFLOAD_KINDS] + [tuple(OFFLOAD_KINDS)]:
        name = "+".join(kinds)
        _sync(device)
        before = torch.cuda.memory_allocated() if device.type == "cuda" else None
        t0 = time.perf_counter()
        stats = actor.offload(kinds)
        _sync(device)
        offload_s = time.perf_counter() - t0
        after = torch.cuda.memory_allocated() if device.type == "cuda" else None
        t0 = time.perf_counter()
        actor.onload(kinds)
        _sync(device)
        onload_s = time.perf_counter() - t0
        copied = sum(b for k, b in stats.bytes.items() if k != "grads")  # grads are dropped, not copied
        row = {"bytes_moved": stats.total_bytes, "offload_s": offload_s, "onload_s": onload_s}
        if copied:
            row["round_trip_gbps"] = 2 * copied / (offload_s + onload_s) / 1e9
            if bounds and bounds.get("host_link_gbps"):
                row["round_trip_vs_host_link"] = row["round_trip_gbps"] / bounds["host_link_gbps"]
        if before is not None:
            row["allocated_drop_bytes"] = before - after
            row["drop_over_moved"] = (before - after) / max(stats.total_bytes, 1)
        out[name] = row
    out["weights_bit_exact"] = all(torch.equal(a, p) for a, p in zip(want, actor.gpt.parameters(), strict=True))
    if not out["weights_bit_exact"]:
        raise AssertionError(f"weights changed across offload/onload: {out}")
    return out


def check_checkpoint(device: torch.device, state_box: dict) -> dict:
    from dapo_megatron.checkpoint.training import load_checkpoint, save_checkpoint

    actor, hf_config = state_box["actor"], state_box["hf_config"]
    want = {n: p.detach().clone() for n, p in actor.gpt.named_parameters()}
    nbytes = sum(t.numel() * t.element_size() for t in want.values())
    with tempfile.TemporaryDirectory() as tmp:
        _sync(device)
        t0 = time.perf_counter()
        path = save_checkpoint(tmp, 1, actor.model, hf_config, optimizer=actor.optimizer, extra_state={"step": 1})
        save_s = time.perf_counter() - t0
        on_disk = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        with torch.no_grad():
            for p in actor.gpt.parameters():
                p.zero_()
        t0 = time.perf_counter()
        load_checkpoint(path, actor.model, hf_config, optimizer=actor.optimizer)
        _sync(device)
        load_s = time.perf_counter() - t0
    bad = [n for n, p in actor.gpt.named_parameters() if not torch.equal(p.detach(), want[n])]
    if bad:
        raise AssertionError(f"parameters differ after reload: {bad[:5]}")
    return {
        "model_bytes": nbytes,
        "checkpoint_bytes": on_disk,
        "save_seconds": save_s,
        "load_seconds": load_s,
        "save_gbps": on_disk / save_s / 1e9,
        "load_gbps": on_disk / load_s / 1e9,
    }


def check_weight_sync(device: torch.device, state_box: dict, bounds: dict | None) -> dict:
    from dapo_megatron.weight_sync.gather import iter_actor_hf_weights
    from dapo_megatron.weight_sync.verify import tensor_checksum

    actor, hf_config = state_box["actor"], state_box["hf_config"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = {n: (tuple(t.shape), t.dtype) for n, t in iter_actor_hf_weights(actor.model, hf_config, dtype=dtype)}
    buffers = {n: torch.empty(s, dtype=d, device=device) for n, (s, d) in shapes.items()}
    nbytes = sum(b.numel() * b.element_size() for b in buffers.values())

    def gather():
        for name, t in iter_actor_hf_weights(actor.model, hf_config, dtype=dtype):
            buffers[name].copy_(t)

    gather_s = _timed(gather, device, repeat=2)
    checksum_s = _timed(lambda: [tensor_checksum(b) for b in buffers.values()], device, repeat=2)
    out = {
        "bytes": nbytes,
        "tensors": len(buffers),
        "gather_gbps": nbytes / gather_s / 1e9,
        "checksum_gbps": nbytes / checksum_s / 1e9,
    }
    if bounds:
        out["gather_vs_copy"] = out["gather_gbps"] / bounds["copy_gbps"]
        out["checksum_vs_copy"] = out["checksum_gbps"] / bounds["copy_gbps"]
    return out


_CONVERT_CHILD = """
import sys, torch
from dapo_megatron.conversion.hf_to_mcore import hf_to_mcore
hf_to_mcore(sys.argv[1], sys.argv[2], progress=False)
print("CUDA_INITIALIZED", torch.cuda.is_initialized())
"""


def check_convert(sizes: Sizes) -> dict:
    cfg, hf = _hf_model(sizes)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(Path(tmp) / "hf")
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", _CONVERT_CHILD, str(Path(tmp) / "hf"), str(Path(tmp) / "mcore")],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"conversion failed (rc={proc.returncode}):\n{proc.stderr[-5000:]}")
    if "CUDA_INITIALIZED False" not in proc.stdout:
        raise AssertionError(f"conversion initialised CUDA:\n{proc.stdout[-2000:]}")
    return {"seconds_with_start_up": seconds, "cuda_initialized": False}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for gpu_check.jsonl")
    ap.add_argument("--cpu", action="store_true", help="dry run on CPU with tiny sizes (gloo)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card (H100/H200: 989)")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        ap.error("no CUDA device: pass --cpu for the dry run")
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    sizes = CPU_SIZES if args.cpu else GPU_SIZES
    if args.cpu:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    report = Report(Path(args.out))
    report.run("environment", lambda: {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "dry_run": args.cpu,
    })  # fmt: skip
    bounds = report.run("bounds", lambda: check_bounds(device, sizes))
    if report.run("backend", check_backend) is None:
        print("gpu_check: no process group, the remaining checks need one", file=sys.stderr)
        return 1
    report.run("hf_parity", lambda: check_hf_parity(device, sizes))
    state_box: dict = {}
    updated = report.run("update", lambda: check_update(device, sizes, bounds, args.peak_tflops, state_box))
    report.run("logprobs", lambda: check_logprobs(device, sizes))
    if updated is not None:
        report.run("offload", lambda: check_offload(device, state_box, bounds))
        report.run("checkpoint", lambda: check_checkpoint(device, state_box))
        report.run("weight_sync", lambda: check_weight_sync(device, state_box, bounds))
    state_box.clear()  # frees the first actor before the larger one
    larger = CPU_SIZES_LARGER if args.cpu else GPU_SIZES_1_5B
    report.run("update_larger", lambda: check_update(device, larger, bounds, args.peak_tflops, state_box))
    state_box.clear()
    report.run("convert", lambda: check_convert(CPU_SIZES))  # the host matters, not the size
    if report.failed:
        print(f"gpu_check: failed checks: {', '.join(report.failed)} (see {report.path})", file=sys.stderr)
        return 1
    print(f"gpu_check: all checks passed ({report.path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
