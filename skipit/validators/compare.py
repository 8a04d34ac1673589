"""Compare two backends' outputs (Polygraphy's idea): report the tolerance that *would* have been needed.

A :class:`LogitComparison` holds max / mean / median / p99 absolute and relative error and top-1
agreement; it is truthy when every element satisfies ``|a − b| ≤ atol + rtol·|b|``, so a failing
comparison still says which ``atol`` would have passed (``required_atol``). A
:class:`GenerationComparison` does the same for greedy token sequences.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from skipit.errors import ExportError


def as_numpy(x: Any) -> np.ndarray:
    """A numpy view of a numpy array, torch tensor or nested list, in float32 or wider."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x)
    wide = np.issubdtype(arr.dtype, np.floating) and arr.dtype.itemsize >= 4
    return arr if wide else arr.astype(np.float64)


@dataclass(frozen=True)
class LogitComparison:
    """Element-wise error of ``candidate`` against ``reference`` (same shape, last axis = vocabulary).

    Relative error is ``|a − b| / |b|`` (``inf`` where ``b == 0`` and ``a != b``). ``required_atol``
    and ``required_rtol`` are the smallest tolerances that would have passed on their own.
    """

    shape: tuple[int, ...]
    atol: float
    rtol: float
    max_abs: float
    mean_abs: float
    median_abs: float
    p99_abs: float
    max_rel: float
    mean_rel: float
    p99_rel: float
    top1_agreement: float
    passed: bool

    @property
    def required_atol(self) -> float:
        return self.max_abs

    @property
    def required_rtol(self) -> float:
        return self.max_rel

    def __bool__(self) -> bool:
        return self.passed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"shape": list(self.shape), "required_atol": self.required_atol,
                               "required_rtol": self.required_rtol}


def compare_logits(candidate: Any, reference: Any, *, atol: float = 1e-4, rtol: float = 0.0) -> LogitComparison:
    """Compare two logit arrays of the same shape (numpy or torch); ``reference`` is the trusted one."""
    a, b = as_numpy(candidate), as_numpy(reference)
    if a.shape != b.shape:
        raise ExportError(f"cannot compare outputs of shapes {a.shape} and {b.shape}; the backends disagree on the "
                          "output layout (vocabulary size or sequence length)")
    if a.size == 0:
        raise ExportError("nothing to compare: the outputs are empty")
    diff = np.abs(a - b)
    ref = np.abs(b)
    rel = np.divide(diff, ref, out=np.where(diff > 0, np.inf, 0.0).astype(diff.dtype), where=ref > 0)
    top1 = float(np.mean(a.argmax(-1) == b.argmax(-1))) if a.ndim else float(a == b)
    return LogitComparison(
        shape=tuple(a.shape), atol=float(atol), rtol=float(rtol),
        max_abs=float(diff.max()), mean_abs=float(diff.mean()), median_abs=float(np.median(diff)),
        p99_abs=float(np.quantile(diff, 0.99, method="higher")),
        max_rel=float(rel.max()), mean_rel=float(rel.mean()), p99_rel=float(np.quantile(rel, 0.99, method="higher")),
        top1_agreement=top1, passed=bool(np.all(diff <= atol + rtol * ref)),
    )


@dataclass(frozen=True)
class GenerationComparison:
    """Agreement of token sequences ``a[i]`` vs ``b[i]`` (greedy generations of two models/backends).

    ``token_match`` counts equal positions over the longer sequence of each pair; ``first_mismatch[i]``
    is the first differing position of pair ``i`` (None when identical). Truthy when all are identical.
    """

    n_sequences: int
    token_match: float
    sequence_match: float
    first_mismatch: list[int | None] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.sequence_match == 1.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sequences(tokens: Any) -> list[list[int]]:
    if hasattr(tokens, "detach"):
        tokens = tokens.detach().cpu().numpy()
    arr = tokens if isinstance(tokens, np.ndarray) else None
    if arr is not None:
        return [arr.astype(np.int64).tolist()] if arr.ndim == 1 else [list(map(int, r)) for r in arr]
    if len(tokens) and not hasattr(tokens[0], "__len__"):
        return [list(map(int, tokens))]
    return [list(map(int, r)) for r in tokens]


def sequence_agreement(a: Sequence[int], b: Sequence[int]) -> tuple[int, int, int | None]:
    """(equal positions, positions compared = the longer length, first mismatch or None)."""
    length = max(len(a), len(b))
    equal = sum(x == y for x, y in zip(a, b))
    first = next((i for i in range(length) if i >= len(a) or i >= len(b) or a[i] != b[i]), None)
    return equal, length, first


def compare_generation(tokens_a: Any, tokens_b: Any) -> GenerationComparison:
    """Compare generated token ids: one sequence (1-D) or a batch (2-D array / list of lists)."""
    seq_a, seq_b = _sequences(tokens_a), _sequences(tokens_b)
    if len(seq_a) != len(seq_b):
        raise ExportError(f"cannot compare {len(seq_a)} generated sequences with {len(seq_b)}")
    rows = [sequence_agreement(a, b) for a, b in zip(seq_a, seq_b)]
    equal, total = sum(r[0] for r in rows), sum(r[1] for r in rows)
    firsts = [r[2] for r in rows]
    return GenerationComparison(
        n_sequences=len(rows),
        token_match=equal / total if total else 1.0,
        sequence_match=sum(f is None for f in firsts) / len(rows) if rows else 1.0,
        first_mismatch=firsts,
    )
