"""The README's main command until the trainer lands: a DAPO pipeline dry run.

Why a simulated policy: the Megatron actor and the vLLM rollout are later
issues, but every stage after generation is real and worth seeing work on real
data. So the responses come from a stand-in policy (each prompt gets a success
rate; a response is the task's reference solution or a corrupted one), and
everything after that is the production code: the reward pool, overlong
shaping, the dynamic-sampling buffer, GRPO advantages and the DAPO loss.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from dapo_megatron.algo.advantage import grpo_advantage
from dapo_megatron.algo.dynamic_sampling import DynamicSamplingBuffer, Group
from dapo_megatron.algo.loss import policy_loss
from dapo_megatron.algo.overlong import apply_overlong_shaping
from dapo_megatron.config import DapoConfig, load_config
from dapo_megatron.data.parquet_dataset import load_prompt_dataset
from dapo_megatron.data.records import PromptRecord
from dapo_megatron.data.sampler import ResumableSampler
from dapo_megatron.data.synthetic import make_arithmetic_task
from dapo_megatron.plot import plot_run
from dapo_megatron.reward.pool import RewardPool
from dapo_megatron.tracking import MetricsLogger

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"


def corrupt(solution: str, rng: random.Random) -> str:
    """A wrong answer of the same shape, so the verifier has to actually parse it."""
    head, _, answer = solution.rpartition("Answer:")
    answer = answer.strip()
    try:
        wrong = str(int(answer) + rng.choice([-10, -1, 1, 10]))
    except ValueError:
        wrong = answer + "0"
    return f"{head}Answer: {wrong}"


def simulate_group(record: PromptRecord, n: int, skill: float, rng: random.Random, rambling: float) -> list[str]:
    """n responses from a stand-in policy that solves this prompt with probability `skill`."""
    solution = record.extra_info["solution"]
    responses = []
    for _ in range(n):
        text = solution if rng.random() < skill else corrupt(solution, rng)
        if rng.random() < rambling:  # long-winded answers exercise the overlong buffer
            text = "Let me think. " * rng.randint(1, 6) + text
        responses.append(text)
    return responses


def run(cfg: DapoConfig, run_dir: Path, steps: int) -> dict:
    t0 = time.perf_counter()
    timings: dict[str, float] = defaultdict(float)
    rng = random.Random(cfg.trainer.seed)
    torch.manual_seed(cfg.trainer.seed)

    tick = time.perf_counter()
    task = make_arithmetic_task(run_dir / "task", num_train=2000, num_val=200, seed=cfg.data.seed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(task.tokenizer_dir))
    dataset = load_prompt_dataset(
        [str(task.train)],
        tokenizer,
        max_prompt_length=cfg.data.max_prompt_length,
        dedup=cfg.data.dedup_prompts,
        filter_overlong_prompts=cfg.data.filter_overlong_prompts,
        truncation=cfg.data.truncation,
    )
    timings["data"] += time.perf_counter() - tick
    prompt_lengths = [len(r.prompt_ids) for r in dataset]
    print(
        f"[data] {dataset.stats.num_kept} prompts ({dataset.stats.num_duplicates} duplicates, "
        f"{dataset.stats.num_too_long} too long); prompt tokens mean {sum(prompt_lengths) / len(prompt_lengths):.1f}"
    )

    sampler = ResumableSampler(len(dataset), seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    fg, ob = cfg.algorithm.filter_groups, cfg.algorithm.overlong_buffer
    buffer = DynamicSamplingBuffer(
        cfg.data.train_batch_size,
        enable=fg.enable,
        metric=fg.metric,
        std_tolerance=fg.std_tolerance,
        max_num_gen_batches=fg.max_num_gen_batches,
        on_exhausted=fg.on_exhausted,
        max_carry_age=fg.max_carry_age,
    )
    # Success rates spread from hopeless to solved, so some groups are uninformative.
    skills = {r.uid: rng.choice([0.0, 0.0, 0.2, 0.5, 0.8, 1.0, 1.0]) for r in dataset}
    n, max_len = cfg.rollout.n, cfg.data.max_response_length
    tracker = MetricsLogger(run_dir, ["jsonl"])
    with RewardPool(
        cfg.reward.backend,
        num_workers=cfg.reward.num_workers,
        timeout_s=cfg.reward.timeout_s,
        strict_box_verify=cfg.reward.strict_box_verify,
        executor=cfg.reward.executor,
    ) as pool:
        for step in range(1, steps + 1):
            buffer.begin_step(step)
            while buffer.should_generate():
                records = [dataset[i] for i in sampler.next_batch(cfg.data.gen_batch_size)]
                responses, truths, lengths = [], [], []
                for rec in records:
                    for text in simulate_group(rec, n, skills[rec.uid], rng, rambling=0.3):
                        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_len]
                        responses.append(tokenizer.decode(ids))
                        truths.append(rec.ground_truth)
                        lengths.append(len(ids))

                tick = time.perf_counter()
                scored = pool.score(responses, truths)
                timings["reward"] += time.perf_counter() - tick
                scores = torch.tensor(scored.scores)
                shaped = apply_overlong_shaping(
                    scores,
                    torch.tensor(lengths),
                    enable=ob.enable,
                    max_response_length=max_len,
                    buffer_length=ob.len,
                    penalty_factor=ob.penalty_factor,
                )
                groups = []
                for g, rec in enumerate(records):
                    sl = slice(g * n, (g + 1) * n)
                    groups.append(
                        Group(
                            uid=rec.uid,
                            metrics={
                                "acc": [float(a) for a in scored.acc[sl]],
                                "score": scores[sl].tolist(),
                                "seq_reward": shaped[sl].tolist(),
                            },
                            payload={"lengths": lengths[sl]},
                        )
                    )
                buffer.add_round(groups)

            batch = buffer.take()
            # An independent check of the filter, on the raw accuracy of what is trained on.
            uninformative = sum(
                1 for grp in batch if len(grp.metrics["acc"]) > 1 and float(np.std(grp.metrics["acc"])) == 0.0
            )
            tick = time.perf_counter()
            rewards = torch.tensor([v for grp in batch for v in grp.metrics["seq_reward"]])
            group_ids = [grp.uid for grp in batch for _ in grp.metrics["seq_reward"]]
            advantages = grpo_advantage(rewards, group_ids, norm_by_std=cfg.algorithm.norm_adv_by_std)
            resp_lengths = torch.tensor([ln for grp in batch for ln in grp.payload["lengths"]])
            mask = torch.arange(max_len)[None, :] < resp_lengths[:, None]
            old = -torch.rand(len(rewards), max_len) * 3
            new = old + 0.3 * torch.randn_like(old)  # a policy that has moved a little
            loss = policy_loss(
                new,
                old,
                advantages,
                mask,
                clip_ratio_low=cfg.algorithm.clip_ratio_low,
                clip_ratio_high=cfg.algorithm.clip_ratio_high,
                clip_ratio_c=cfg.algorithm.clip_ratio_c,
                loss_agg_mode=cfg.algorithm.loss_agg_mode,
            )
            timings["algo"] += time.perf_counter() - tick
            metrics = {k: float(v) for k, v in buffer.metrics().items()}
            metrics.update({f"actor/{k}": float(v) for k, v in loss.items()})
            metrics.update(
                {
                    "critic/score/mean": float(torch.tensor([v for grp in batch for v in grp.metrics["score"]]).mean()),
                    "critic/rewards/mean": float(rewards.mean()),
                    "critic/advantages/max": float(advantages.max()),
                    "critic/advantages/min": float(advantages.min()),
                    "response_length/mean": float(resp_lengths.float().mean()),
                    "response_length/clip_ratio": float((resp_lengths >= max_len).float().mean()),
                    "demo/trained_groups": float(len(batch)),
                    "demo/uninformative_trained_groups": float(uninformative),
                }
            )
            metrics.update({k: float(v) for k, v in pool.metrics().items()})
            tracker.log(metrics, step=step)
            m = metrics
            print(
                f"[step {step}] gen rounds {m['train/num_gen_batches']:.0f}, "
                f"kept {m['dynamic_sampling/kept_groups']:.0f} / filtered {m['dynamic_sampling/filtered_groups']:.0f}, "
                f"carried {m['dynamic_sampling/carried_groups']:.0f}; score {m['critic/score/mean']:+.2f}; "
                f"pg_loss {m['actor/pg_loss']:+.4f} clipfrac {m['actor/pg_clipfrac']:.3f} "
                f"lower {m['actor/pg_clipfrac_lower']:.4f}; resp len {m['response_length/mean']:.1f} "
                f"(clip {m['response_length/clip_ratio']:.2f})"
            )

    tracker.close()
    plots = plot_run(run_dir)
    timings["total"] = time.perf_counter() - t0
    summary = {"steps": steps, "timings_s": dict(timings), "metrics_file": str(run_dir / "metrics.jsonl")}
    print("\n=== summary (simulated policy; the Megatron actor and vLLM rollout are not wired in yet) ===")
    print("time per stage: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    print(f"metrics: {summary['metrics_file']}; plots: {plots[-1]}")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = load_config(args.config, args.overrides)
    run(cfg, Path(args.run_dir), args.steps)


if __name__ == "__main__":
    main()
