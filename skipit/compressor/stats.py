"""Small statistics helpers: ratio-of-sums means with paired bootstrap confidence intervals.

Token-level quantities are accumulated per *sample* (sequence) as a sum and a count; the mean is the
ratio of totals and its uncertainty comes from resampling samples (tokens of one sequence are not
independent, so resampling tokens would understate it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A mean with a two-sided bootstrap interval at ``confidence`` (``lo`` ≤ mean ≤ ``hi``)."""

    mean: float
    lo: float
    hi: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": int(self.n)}


def bootstrap_ratio(
    sums: np.ndarray, counts: np.ndarray, *, confidence: float = 0.95, n_boot: int = 1000, seed: int = 0, one_sided: bool = False
) -> list[Estimate]:
    """Mean ``sum(sums)/sum(counts)`` per column with bootstrap bounds over rows (samples).

    ``sums`` has shape [samples] or [samples, k]; ``counts`` has shape [samples]. With ``one_sided``
    the ``hi`` (and ``lo``) bound is the one-sided ``confidence`` quantile, as a certificate needs.
    """
    sums = np.asarray(sums, dtype=np.float64)
    squeeze = sums.ndim == 1
    sums = sums[:, None] if squeeze else sums
    counts = np.asarray(counts, dtype=np.float64)
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    n = len(counts)
    if n == 0:
        return [Estimate(float("nan"), float("nan"), float("nan"), 0) for _ in range(sums.shape[1])]
    mean = sums.sum(0) / counts.sum()
    idx = bootstrap_indices(n, n_boot=n_boot, seed=seed)
    boot = sums[idx].sum(1) / counts[idx].sum(1)[:, None]  # [n_boot, k]
    tail = (1 - confidence) if one_sided else (1 - confidence) / 2
    lo, hi = np.quantile(boot, tail, axis=0), np.quantile(boot, 1 - tail, axis=0)
    return [Estimate(float(m), float(min(m, a)), float(max(m, b)), n) for m, a, b in zip(mean, lo, hi)]


def bootstrap_indices(n: int, *, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Resampled row ids [n_boot, n]. The same ``seed`` and ``n`` give the same draws, so statistics
    computed on the same samples with the same seed are *paired* (every draw uses the same samples)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_quantile(
    values: np.ndarray, rows: np.ndarray, counts: np.ndarray, q: float, *,
    confidence: float = 0.95, n_boot: int = 1000, seed: int = 0,
) -> Estimate:
    """The ``q`` quantile of token-level ``values`` (pooled over samples) with a bootstrap interval.

    ``rows[i]`` is the sample of ``values[i]``; ``counts`` has one entry per sample. Samples with a
    zero count are dropped exactly as in :func:`bootstrap_ratio`, and the draws are the same (same
    ``seed``), so the interval is paired with the ratio estimates of the same samples.
    """
    values = np.asarray(values, dtype=np.float64)
    keep = np.asarray(counts) > 0
    n = int(keep.sum())
    if n == 0 or len(values) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    compact = np.cumsum(keep) - 1  # sample id → position among kept samples
    order = values.argsort(kind="stable")
    sorted_values, sorted_rows = values[order], compact[np.asarray(rows)[order]]

    def weighted(weights: np.ndarray) -> float:
        cum = np.cumsum(weights)
        return float(sorted_values[min(np.searchsorted(cum, q * cum[-1]), len(cum) - 1)])

    point = weighted(np.ones(len(sorted_values)))
    draws = np.array([weighted(np.bincount(d, minlength=n)[sorted_rows]) for d in bootstrap_indices(n, n_boot=n_boot, seed=seed)])
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(draws, tail), np.quantile(draws, 1 - tail)
    return Estimate(point, float(min(point, lo)), float(max(point, hi)), n)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    rx, ry = rank01(np.asarray(x)), rank01(np.asarray(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(np.sqrt((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def rank01(values: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (0 = smallest); ties share their average rank."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) <= 1:
        return np.zeros_like(values)
    order = values.argsort(kind="stable")
    ranks = np.empty_like(values)
    ranks[order] = np.arange(len(values))
    for v in np.unique(values):  # average ties
        tie = values == v
        ranks[tie] = ranks[tie].mean()
    return ranks / (len(values) - 1)
