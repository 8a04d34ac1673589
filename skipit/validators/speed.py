"""Latency of several runners (torch original, torch slim, ONNX Runtime slim …), measured fairly.

Runners share one small interface (:class:`skipit.runtime.base.Runner`): ``name``, ``device``, ``vocab_size``,
``prefill(input_ids) -> seconds`` (one full forward at batch 1, no cache), ``decode(input_ids, n) ->
seconds`` (prefill without timing, then ``n`` greedy steps with the KV cache, timed) and
``peak_memory()``. Each runner times itself (:mod:`skipit.runtime`): CUDA work with ``torch.cuda.Event``
pairs, CPU work (and ONNX Runtime, whose outputs are on the host when ``run`` returns) with
``time.perf_counter``.

:func:`measure_speed` runs the runners **interleaved** (A B C, B C A, C A B, …: rotated each round) so that
drift (thermal, other processes) hits all of them alike, drops the warm-up rounds, and reports the
median with the interquartile range and min/max per runner, plus ratios against a baseline runner.
The executed order is recorded in ``schedule``.

Memory: on CUDA (torch) the peak of ``torch.cuda.max_memory_allocated`` over the runner's calls; on
CPU the growth of the process' resident memory across the runner's calls — a rough, lower-bound figure,
since runners share the process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from skipit.errors import InvalidOptionError
from skipit.runtime.base import Runner

log = logging.getLogger(__name__)

#: Pause before each timed call (seconds): OpenMP workers of the previous call spin for a few milliseconds after
#: it; on a machine with as many threads as cores they would slow whatever runs next.
SETTLE_S = 0.01


@dataclass(frozen=True)
class Timing:
    """Milliseconds over the measured (non-warm-up) repeats."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    samples: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, seconds: Sequence[float]) -> "Timing":
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        q1, med, q3 = np.quantile(ms, [0.25, 0.5, 0.75])
        return cls(float(med), float(q1), float(q3), float(ms.min()), float(ms.max()), [float(x) for x in ms])


@dataclass
class RunnerSpeed:
    """One runner's results. ``decode`` is per generated token (ms); ``tokens_per_s`` = 1000 / its median.

    Ratios are against the baseline: ``*_latency_ratio`` = this / baseline (< 1 is faster),
    ``*_speedup`` = baseline / this.
    """

    name: str
    device: str
    prefill: dict[int, Timing]
    decode: Timing | None
    tokens_per_s: float | None
    memory: dict[str, Any] | None
    prefill_latency_ratio: dict[int, float] = field(default_factory=dict)
    prefill_speedup: dict[int, float] = field(default_factory=dict)
    decode_latency_ratio: float | None = None
    decode_speedup: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("prefill", "prefill_latency_ratio", "prefill_speedup"):
            out[key] = {str(k): v for k, v in out[key].items()}
        return out


@dataclass
class SpeedResult:
    """Everything :func:`measure_speed` measured; ``as_dict()`` is JSON-able (``runners`` is a flat table)."""

    runners: dict[str, RunnerSpeed]
    baseline: str
    seq_lens: tuple[int, ...]
    repeats: int
    warmup: int
    decode_tokens: int
    decode_prompt_len: int
    schedule: list[dict[str, Any]]

    def rows(self) -> list[dict[str, Any]]:
        """One row per runner × measurement (``runner``, ``median_ms``, ``lo_ms``/``hi_ms`` = IQR, …)."""
        rows = []
        for r in self.runners.values():
            items = [(f"prefill {n}", t, r.prefill_latency_ratio.get(n)) for n, t in r.prefill.items()]
            if r.decode is not None:
                items.append((f"decode /token ({self.decode_tokens})", r.decode, r.decode_latency_ratio))
            for what, t, ratio in items:
                rows.append({"runner": f"{r.name} · {what}", "name": r.name, "phase": what.split()[0],
                             "median_ms": t.median, "lo_ms": t.q1, "hi_ms": t.q3, "min_ms": t.min, "max_ms": t.max,
                             "ratio_vs_baseline": ratio,
                             "tokens_per_s": r.tokens_per_s if what.startswith("decode") else None})
        return rows

    def as_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "seq_lens": list(self.seq_lens), "repeats": self.repeats,
                "warmup": self.warmup, "decode_tokens": self.decode_tokens, "decode_prompt_len": self.decode_prompt_len,
                "runners": self.rows(), "per_runner": {k: v.as_dict() for k, v in self.runners.items()},
                "schedule": self.schedule}


@dataclass(frozen=True)
class SpeedConfig:
    """Keyword options of :func:`measure_speed`, as one object (``measure_speed(runners, **asdict(cfg))``)."""

    seq_lens: tuple[int, ...] = (32, 128, 256)
    repeats: int = 5
    warmup: int = 1
    decode_tokens: int = 32
    decode_prompt_len: int | None = None
    seed: int = 0
    rotate: bool = True
    settle_s: float = SETTLE_S


def _interleaved(runners: Mapping[str, Runner], rounds: int, warmup: int, label: dict[str, Any],
                 call: Callable[[Runner], float], schedule: list[dict[str, Any]], rotate: bool = True,
                 settle_s: float = SETTLE_S) -> dict[str, list[float]]:
    """Run ``call`` for every runner in turn, ``rounds`` times; keep the times after ``warmup`` rounds.

    With ``rotate`` the order rotates each round (A B C, B C A, C A B …), so that no runner always follows the
    same one; each call starts after ``settle_s`` of quiet."""
    kept: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for rnd in range(rounds):
        shift = rnd % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            runner = runners[name]
            if settle_s:
                time.sleep(settle_s)
            seconds = call(runner)
            schedule.append(label | {"round": rnd, "runner": name, "warmup": rnd < warmup})
            if rnd >= warmup:
                kept[name].append(seconds)
    return kept


def measure_speed(
    runners: Mapping[str, Runner],
    seq_lens: Sequence[int] = (32, 128, 256),
    repeats: int = 5,
    warmup: int = 1,
    *,
    decode_tokens: int = 32,
    decode_prompt_len: int | None = None,
    baseline: str | None = None,
    seed: int = 0,
    rotate: bool = True,
    settle_s: float = SETTLE_S,
) -> SpeedResult:
    """Prefill latency at batch 1 for each of ``seq_lens`` and decode speed, runners interleaved.

    Inputs are the same random token ids for every runner (below the smallest vocabulary). Decoding
    starts from a prompt of ``decode_prompt_len`` tokens (default: the shortest ``seq_lens``) and
    generates ``decode_tokens`` greedily; ``decode_tokens=0`` skips it. ``baseline`` (default: the first
    runner) is what ratios are taken against. ``rotate`` / ``settle_s``: see :func:`_interleaved`.
    """
    if not runners:
        raise InvalidOptionError("measure_speed needs at least one runner")
    if repeats < 1 or warmup < 0 or decode_tokens < 0 or not seq_lens or min(seq_lens) < 1:
        raise InvalidOptionError("repeats must be ≥ 1, warmup and decode_tokens ≥ 0, every seq_len ≥ 1")
    baseline = baseline or next(iter(runners))
    if baseline not in runners:
        raise InvalidOptionError(f"baseline {baseline!r} is not a runner; choose one of {', '.join(runners)}")
    prompt_len = decode_prompt_len or min(seq_lens)
    vocabs = [r.vocab_size for r in runners.values() if r.vocab_size]
    vocab = min(vocabs) if vocabs else 256
    ids = np.random.default_rng(seed).integers(0, vocab, size=(1, max(*seq_lens, prompt_len)), dtype=np.int64)
    schedule: list[dict[str, Any]] = []
    rounds = warmup + repeats
    order: dict[str, Any] = {"rotate": rotate, "settle_s": settle_s}

    def prefill_of(n: int) -> Callable[[Runner], float]:
        return lambda r: r.prefill(ids[:, :n])

    prefill = {n: _interleaved(runners, rounds, warmup, {"phase": "prefill", "seq_len": n}, prefill_of(n), schedule,
                               **order) for n in seq_lens}
    decode = _interleaved(runners, rounds, warmup, {"phase": "decode", "seq_len": prompt_len},
                          lambda r: r.decode(ids[:, :prompt_len], decode_tokens) / decode_tokens,
                          schedule, **order) if decode_tokens else {}
    result: dict[str, RunnerSpeed] = {}
    for name, runner in runners.items():
        dec = Timing.of(decode[name]) if decode else None
        result[name] = RunnerSpeed(name, runner.device, {n: Timing.of(prefill[n][name]) for n in seq_lens}, dec,
                                   1000.0 / dec.median if dec and dec.median > 0 else None, runner.peak_memory())
    base = result[baseline]
    for r in result.values():
        r.prefill_latency_ratio = {n: r.prefill[n].median / base.prefill[n].median for n in seq_lens}
        r.prefill_speedup = {n: 1.0 / v for n, v in r.prefill_latency_ratio.items()}
        if r.decode is not None and base.decode is not None:
            r.decode_latency_ratio = r.decode.median / base.decode.median
            r.decode_speedup = 1.0 / r.decode_latency_ratio
    log.info("speed: %s", {k: round(v.prefill[max(seq_lens)].median, 2) for k, v in result.items()})
    return SpeedResult(result, baseline, tuple(seq_lens), repeats, warmup, decode_tokens, prompt_len, schedule)
