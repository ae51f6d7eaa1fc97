"""Generation throughput: our VllmEngine.generate vs vLLM's own LLM.generate on the same prompts.

    .venv/bin/python bench/rollout_throughput.py [--prompts 32] [--n 8] [--max-tokens 64] \
        [--prompt-len 64] [--repeats 3] [--dtype float32] [--hidden 256 --layers 4]

Single process (one replica), one engine: both paths run on the same ``LLM`` object, so
the difference is exactly our wrapper's work -- per-prompt seeds, the sampled tokens'
log-probs (``logprobs=0``), building :class:`Rollouts` -- against a plain
``LLM.generate(prompts, SamplingParams(n, temperature, max_tokens, seed))`` without
log-probs.  ``ignore_eos`` is not used: the random model's EOS rate is ~1/vocab, tokens are
counted from the outputs either way.  Reported: min time over ``--repeats``, generated
tokens/s and the ratio wrapper/raw (tokens per second).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args(argv)

    import torch
    import transformers
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from dapo_megatron.rollout.engine import SamplingSpec
    from dapo_megatron.rollout.vllm_engine import VllmEngine

    heads = max(1, args.hidden // 64)
    cfg = transformers.Qwen2Config(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        intermediate_size=args.hidden * 3,
        vocab_size=args.vocab,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=2,
    )
    model_dir = tempfile.mkdtemp(prefix="bench_rollout_")
    try:
        torch.manual_seed(0)
        transformers.Qwen2ForCausalLM(cfg).save_pretrained(model_dir)
        engine = VllmEngine(
            model_dir,
            dtype=args.dtype,
            max_model_len=args.prompt_len + args.max_tokens + 8,
            skip_tokenizer_init=True,
            max_num_seqs=256,
        )
        gen = torch.Generator().manual_seed(0)
        prompts = [
            torch.randint(3, args.vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.prompts)
        ]
        spec = SamplingSpec(temperature=1.0, max_tokens=args.max_tokens)

        def ours(seed: int) -> int:
            ro = engine.generate(prompts, args.n, spec, seed=seed)
            return sum(ro.lengths)

        def raw(seed: int) -> int:
            params = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=seed, detokenize=False)
            outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
            return sum(len(c.token_ids) for o in outs for c in o.outputs)

        ours(0)  # warm-up (first-call allocations)
        rows = {}
        for name, fn in (("raw LLM.generate", raw), ("VllmEngine.generate", ours)):
            best, toks = float("inf"), 0
            for r in range(args.repeats):
                engine.reset_prefix_cache()
                t0 = time.perf_counter()
                toks = fn(100 + r)
                best = min(best, time.perf_counter() - t0)
            rows[name] = (best, toks)
        n_params = sum(p.numel() for p in transformers.Qwen2ForCausalLM(cfg).parameters())
        print(
            f"model {n_params / 1e6:.1f}M params, {args.dtype}; {args.prompts} prompts x n={args.n}, "
            f"prompt {args.prompt_len} tokens, up to {args.max_tokens} new tokens; engine start-up "
            f"{engine.startup_s:.1f} s"
        )
        print("| path | seconds | generated tokens | tokens/s |")
        print("|---|---|---|---|")
        for name, (s, toks) in rows.items():
            print(f"| {name} | {s:.3f} | {toks} | {toks / s:,.0f} |")
        (s_raw, t_raw), (s_ours, t_ours) = rows["raw LLM.generate"], rows["VllmEngine.generate"]
        print(f"ratio (ours / raw tokens/s): {(t_ours / s_ours) / (t_raw / s_raw):.3f}")
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    sys.exit(main())
