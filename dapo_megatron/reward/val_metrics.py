"""Validation metrics for sets scored avg@k (every problem sampled k times).

Why per-problem means first: avg@k is the expected accuracy of one sample,
averaged over problems; computing it per problem first keeps each problem's
weight equal even if the caller shuffled or interleaved samples, and the
per-problem means are also what the spread (std@k) and pass@k need.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np


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
    ``val-aux/s/acc/std@k`` (population std of the per-problem means) and
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
    per_problem: dict[Hashable, list[float]] = defaultdict(list)
    source_of: dict[Hashable, str] = {}
    for value, gid, source in zip(acc, group_ids, data_sources, strict=True):
        if value not in (0, 1):  # True/False compare equal to 1/0
            raise ValueError(f"acc values must be bool or 0/1, got {value!r} for problem {gid!r}")
        if source_of.setdefault(gid, source) != source:
            raise ValueError(f"problem {gid!r} has samples from data sources {source_of[gid]!r} and {source!r}")
        per_problem[gid].append(float(value))

    by_source: dict[str, list[Hashable]] = defaultdict(list)
    for gid, source in source_of.items():
        by_source[source].append(gid)

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
        metrics[f"val-aux/{source}/acc/std@{k}"] = float(means.std())
        metrics[f"val-aux/{source}/pass@{k}"] = float((means > 0).mean())
        if k > 1:
            sem = np.sqrt(np.sum(means * (1.0 - means) / (k - 1))) / len(means)
            metrics[f"val-aux/{source}/acc/sem@{k}"] = float(sem)
    return metrics
