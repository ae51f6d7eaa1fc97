"""How much does the held-out accuracy estimate move when only the sampling dice change?

A learning claim ("accuracy rose by X") needs X compared with the spread of the
measurement itself. This evaluates the same weights with several validation seeds
(``trainer.val_only=true rollout.val.seed=S`` through launch/train.py, so the numbers
come from the production validation path) and reports the mean and spread of avg@k.

    .venv/bin/python bench/val_noise.py --model runs/tiny/sft_model --task-dir runs/tiny/task \
        --seeds 5 [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def evaluate(model: str, task_dir: Path, seed: int, overrides: list[str], workdir: Path) -> float:
    out = workdir / f"seed{seed}"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(ROOT / "launch" / "train.py"),
        "--config",
        str(ROOT / "configs" / "tiny_cpu.yaml"),
        f"data.train_files=[{task_dir / 'train.parquet'}]",
        f"data.val_files=[{task_dir / 'val.parquet'}]",
        f"data.tokenizer_path={task_dir / 'tokenizer'}",
        f"actor.model_path={model}",
        f"trainer.output_dir={out}",
        "trainer.val_only=true",
        f"rollout.val.seed={seed}",
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"validation with seed {seed} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    values = [v for r in rows for k, v in r.items() if k.startswith("val-core/")]
    if len(values) != 1:
        raise SystemExit(f"expected one val-core metric in {out / 'metrics.jsonl'}, found {len(values)}")
    return values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model directory to evaluate")
    parser.add_argument("--task-dir", required=True, type=Path, help="directory with train/val parquet + tokenizer")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="key.sub=value for the validation (e.g. rollout.val.n=8)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        accs = [evaluate(args.model, args.task_dir, s, args.overrides, Path(tmp)) for s in range(1, args.seeds + 1)]
    for s, a in enumerate(accs, 1):
        print(f"seed {s}: {a:.4f}")
    sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
    print(f"mean {statistics.mean(accs):.4f}  std {sd:.4f}  range {min(accs):.4f}..{max(accs):.4f}  (n={len(accs)})")


if __name__ == "__main__":
    main()
