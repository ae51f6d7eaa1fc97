"""Validation metrics for sets scored avg@k (every problem sampled k times).

Why per-problem means first: avg@k is the expected accuracy of one sample,
averaged over problems; computing it per problem first keeps each problem's
weight equal even if the caller shuffled or interleaved samples, and the
per-problem means are also what the spread and pass@k need.

Two families: :func:`avg_at_k` (ours: mean@k, pass@k, sem@k) and
:func:`verl_val_metrics` (verl's ``process_validation_metrics``: mean@k, std@k and the
bootstrapped best@n / worst@n / maj@n), so a dashboard built on verl runs reads ours.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np


def _problems_by_source(
    group_ids: Sequence[Hashable], data_sources: Sequence[str]
) -> tuple[dict[Hashable, list[int]], dict[str, list[Hashable]]]:
    """Each problem's sample positions, and each data source's problems (one source per problem)."""
    samples: dict[Hashable, list[int]] = defaultdict(list)
    source_of: dict[Hashable, str] = {}
    for i, (gid, source) in enumerate(zip(group_ids, data_sources, strict=True)):
        if source_of.setdefault(gid, source) != source:
            raise ValueError(f"problem {gid!r} has samples from data sources {source_of[gid]!r} and {source!r}")
        samples[gid].append(i)
    by_source: dict[str, list[Hashable]] = defaultdict(list)
    for gid, source in source_of.items():
        by_source[source].append(gid)
    return samples, by_source


def avg_at_k(
    acc: Sequence[bool | int | float],
    group_ids: Sequence[Hashable],
    data_sources: Sequence[str],
) -> dict[str, float]:
    """avg@k accuracy per data source, with verl's metric names.

    ``acc[i]`` is the correctness (True/False or 1/0) of sample ``i``,
    ``group_ids[i]`` identifies its problem and ``data_sources[i]`` its data
    set. ``k`` is the number of samples per problem and may differ between data
    sources, but must be the same for every problem of one source: a short
    group usually means lost samples, which would bias the mean silently.

    Returns, per source ``s``:
    ``val-core/s/acc/mean@k`` (mean over problems of the per-problem mean),
    ``val-aux/s/acc/problem_std@k`` (population std of the per-problem means; verl's
    ``std@k`` is a different quantity, see :func:`verl_val_metrics`) and
    ``val-aux/s/pass@k`` (fraction of problems with at least one correct sample) and,
    for k > 1, ``val-aux/s/acc/sem@k``: the standard error of mean@k from the sampling
    dice alone, the problems held fixed (what changes when only the validation seed
    does). Each problem's k samples estimate its own Bernoulli variance without bias as
    p(1 - p) k / (k - 1), so its mean has variance p(1 - p) / (k - 1); mean@k averages n
    independent problems. A difference of two evaluations is noise up to about
    sqrt(sem_a^2 + sem_b^2).
    """
    if not len(acc) == len(group_ids) == len(data_sources):
        raise ValueError(
            "acc, group_ids and data_sources must have the same length, got "
            f"{len(acc)}, {len(group_ids)}, {len(data_sources)}"
        )
    for value, gid in zip(acc, group_ids, strict=True):
        if value not in (0, 1):  # True/False compare equal to 1/0
            raise ValueError(f"acc values must be bool or 0/1, got {value!r} for problem {gid!r}")
    samples, by_source = _problems_by_source(group_ids, data_sources)
    per_problem = {gid: [float(acc[i]) for i in rows] for gid, rows in samples.items()}
    metrics: dict[str, float] = {}
    for source in sorted(by_source):
        gids = by_source[source]
        k = len(per_problem[gids[0]])
        for gid in gids:
            if len(per_problem[gid]) != k:
                raise ValueError(
                    f"problem {gid!r} of data source {source!r} has {len(per_problem[gid])} "
                    f"samples, but problem {gids[0]!r} has {k}"
                )
        means = np.array([np.mean(per_problem[gid]) for gid in gids])
        metrics[f"val-core/{source}/acc/mean@{k}"] = float(means.mean())
        metrics[f"val-aux/{source}/acc/problem_std@{k}"] = float(means.std())
        metrics[f"val-aux/{source}/pass@{k}"] = float((means > 0).mean())
        if k > 1:
            sem = np.sqrt(np.sum(means * (1.0 - means) / (k - 1))) / len(means)
            metrics[f"val-aux/{source}/acc/sem@{k}"] = float(sem)
    return metrics


# verl's process_validation_metrics draws with numpy's legacy generator seeded 42, 1000 times.
VERL_BOOTSTRAP_SEED = 42
VERL_BOOTSTRAP_DRAWS = 1000


def bootstrap_sizes(k: int) -> list[int]:
    """The subset sizes verl bootstraps for k samples: the powers of two below k, then k itself."""
    sizes, n = [], 2
    while n < k:
        sizes.append(n)
        n *= 2
    return [*sizes, k] if k > 1 else []


def bootstrap_indices(k: int, size: int, *, seed: int = VERL_BOOTSTRAP_SEED, draws: int = VERL_BOOTSTRAP_DRAWS):
    """[draws, size] sample indices, drawn with replacement from range(k).

    Why a private ``RandomState`` rather than the global seed verl sets: the same stream (numpy's
    legacy Mersenne Twister, one ``choice`` per draw is the same as one [draws, size] ``choice``),
    so the numbers equal verl's for the same samples, without resetting anyone else's RNG.
    """
    return np.random.RandomState(seed).choice(k, size=(draws, size), replace=True)


def majority_positions(votes: np.ndarray) -> np.ndarray:
    """For each row of ``votes`` [draws, n] (integer-coded answers), the position whose value counts.

    verl's majority vote: the answer given most often wins; a tie goes to the answer that
    appears first in the row; the result is the value of that answer's first occurrence.
    Returns the column of that first occurrence, [draws].
    """
    n = votes.shape[1]
    same = votes[:, :, None] == votes[:, None, :]
    counts = same.sum(-1)  # how often each position's answer occurs in its row
    first = same.argmax(-1)  # where that answer first occurs
    # most votes, then the earliest answer; argmax takes the first of the equal keys of the
    # winning answer's positions, which is its first occurrence
    return (counts * (n + 1) + (n - first)).argmax(-1)


def verl_val_metrics(
    values: dict[str, Sequence[float]],
    group_ids: Sequence[Hashable],
    data_sources: Sequence[str],
    preds: Sequence[str] | None = None,
    *,
    seed: int = VERL_BOOTSTRAP_SEED,
    draws: int = VERL_BOOTSTRAP_DRAWS,
) -> dict[str, float]:
    """verl's validation metrics (``process_validation_metrics`` and the names its trainer logs).

    ``values`` maps a variable name (``acc``, ``score``, ``reward``) to one number per sample;
    ``preds`` are the verifier's predicted answers, which vote for maj@n. Per problem with k
    samples, then averaged over the problems of each data source:

    * ``mean@k``; for k > 1, ``std@k``: the population std of the problem's own k values;
    * for each bootstrap size n (:func:`bootstrap_sizes`): ``best@n/mean`` and ``best@n/std``,
      the mean and population std over ``draws`` resamples of n of the k values (with
      replacement) of their maximum; ``worst@n/*`` the same of the minimum; ``maj@n/*`` of the
      value of the majority answer (:func:`majority_positions`).

    Deterministic by construction, as verl's: every (problem, n) draws from a generator seeded
    with ``seed`` (verl's 42), the same stream as verl's, so identical samples in the same order
    give verl's numbers. maj@n is left out for a data source none of whose samples has a
    prediction (a scorer that returns only a score), as verl leaves it out without ``pred``.

    Names, as verl's trainer logs them: ``val-core/{source}/{var}/{metric}`` for the core
    variable (``acc`` if given, else ``reward``) and a metric starting with mean, maj or best at
    n = k; ``val-aux/{source}/{var}/{metric}`` for everything else.
    """
    n_samples = len(group_ids)
    if len(data_sources) != n_samples or (preds is not None and len(preds) != n_samples):
        raise ValueError(
            f"group_ids, data_sources and preds must have the same length, got {n_samples}, {len(data_sources)}, "
            f"{None if preds is None else len(preds)}"
        )
    for name, column in values.items():
        if len(column) != n_samples:
            raise ValueError(f"values[{name!r}] has {len(column)} entries for {n_samples} samples")
    samples, by_source = _problems_by_source(group_ids, data_sources)
    columns = {name: np.asarray(column, dtype=np.float64) for name, column in values.items()}
    codes = None if preds is None else np.unique(np.asarray(preds, dtype=object).astype(str), return_inverse=True)[1]
    core = "acc" if "acc" in columns else "reward"
    indices: dict[tuple[int, int], np.ndarray] = {}
    metrics: dict[str, float] = {}
    for source in sorted(by_source):
        gids = by_source[source]
        vote = preds is not None and any(preds[i] for gid in gids for i in samples[gid])
        per_problem: dict[tuple[str, str], list[float]] = defaultdict(list)
        for gid in gids:
            rows = np.asarray(samples[gid])
            k = len(rows)
            majority = {}
            for n in bootstrap_sizes(k):
                idx = indices.setdefault((k, n), bootstrap_indices(k, n, seed=seed, draws=draws))
                if vote:
                    majority[n] = idx[np.arange(draws), majority_positions(codes[rows][idx])]
            for name, column in columns.items():
                own = column[rows]
                per_problem[(name, f"mean@{k}")].append(float(own.mean()))
                if k == 1:
                    continue
                per_problem[(name, f"std@{k}")].append(float(own.std()))
                for n in bootstrap_sizes(k):
                    drawn = own[indices[(k, n)]]
                    stats = {"best": drawn.max(-1), "worst": drawn.min(-1)}
                    if vote:
                        stats["maj"] = own[majority[n]]
                    for kind, per_draw in stats.items():
                        per_problem[(name, f"{kind}@{n}/mean")].append(float(per_draw.mean()))
                        per_problem[(name, f"{kind}@{n}/std")].append(float(per_draw.std()))
        k_max = max(len(samples[gid]) for gid in gids)
        for (name, metric), per in per_problem.items():
            head, n = metric.split("/")[0].split("@")
            is_core = name == core and head in ("mean", "maj", "best") and int(n) == k_max
            metrics[f"{'val-core' if is_core else 'val-aux'}/{source}/{name}/{metric}"] = float(np.mean(per))
    return metrics


_HELD_OUT = re.compile(r"^val-core/[^/]+/acc/mean@\d+$")


def is_held_out_accuracy(key: str) -> bool:
    """``val-core/<source>/acc/mean@k``: the held-out accuracy of one data source.

    ``val-core/`` also holds verl's best@n and maj@n statistics (means and standard
    deviations), so "every val-core key" is not an accuracy; the warm-up's stopping rule,
    the demo's verdict, the console line and the plots all read these keys only.
    """
    return bool(_HELD_OUT.match(key))


def held_out_accuracy(metrics) -> float | None:
    """The mean over data sources of :func:`is_held_out_accuracy` keys (None: none logged)."""
    values = [v for k, v in metrics.items() if is_held_out_accuracy(k)]
    return sum(values) / len(values) if values else None
