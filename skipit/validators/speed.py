"""Latency of several runners (torch original, torch slim, ONNX Runtime slim …), measured fairly.

Runners share one small interface (:class:`Runner`): ``name``, ``device``, ``vocab_size``,
``prefill(input_ids) -> seconds`` (one full forward at batch 1, no cache), ``decode(input_ids, n) ->
seconds`` (prefill without timing, then ``n`` greedy steps with the KV cache, timed) and
``peak_memory()``. Each runner times itself: CUDA work with ``torch.cuda.Event`` pairs, CPU work (and
ONNX Runtime, whose outputs are on the host when ``run`` returns) with ``time.perf_counter``.

:func:`measure_speed` runs the runners **interleaved** (A B C, B C A, C A B, …: rotated each round) so that
drift (thermal, other processes) hits all of them alike, drops the warm-up rounds, and reports the
median with the interquartile range and min/max per runner, plus ratios against a baseline runner.
The executed order is recorded in ``schedule``.

Memory: on CUDA (torch) the peak of ``torch.cuda.max_memory_allocated`` over the runner's calls; on
CPU the growth of the process' resident memory across the runner's calls (psutil; without it the
growth of the lifetime peak from ``resource.getrusage``) — a rough, lower-bound figure, since
runners share the process.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from skipit.errors import BackendUnavailableError, InvalidOptionError

log = logging.getLogger(__name__)

#: Pause before each timed call (seconds): OpenMP workers of the previous call spin for a few milliseconds after
#: it; on a machine with as many threads as cores they would slow whatever runs next.
SETTLE_S = 0.01


class Runner(Protocol):
    """What :func:`measure_speed` needs from a backend."""

    name: str
    device: str
    vocab_size: int

    def prefill(self, input_ids: np.ndarray) -> float:
        """One forward over ``input_ids`` [1, T] without a cache; seconds."""

    def decode(self, input_ids: np.ndarray, n_tokens: int) -> float:
        """Prefill ``input_ids`` (not timed), then ``n_tokens`` greedy cached steps; seconds for the steps."""

    def peak_memory(self) -> dict[str, Any] | None:
        """``{"method": str, "bytes": int}`` observed so far, or None where it cannot be measured."""


class _RssMemory:
    """Resident-memory growth of the process across this runner's calls (see the module docstring)."""

    _rss_base: int | None = None
    _rss_peak: int = 0

    @staticmethod
    def _rss() -> tuple[str, int]:
        try:
            import psutil

            return "cpu_rss_growth_psutil", int(psutil.Process().memory_info().rss)
        except ImportError:
            import resource

            return "cpu_maxrss_growth_getrusage", int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def _memory_before(self) -> None:
        if self._rss_base is None:
            self._rss_base = self._rss()[1]

    def _memory_after(self) -> None:
        self._rss_peak = max(self._rss_peak, self._rss()[1] - (self._rss_base or 0))

    def peak_memory(self) -> dict[str, Any] | None:
        return {"method": self._rss()[0], "bytes": self._rss_peak} if self._rss_base is not None else None


class TorchRunner(_RssMemory):
    """A transformers causal LM (text decoding). CUDA timings use ``torch.cuda.Event``."""

    def __init__(self, model: Any, name: str = "torch") -> None:
        self.model = model
        self.name = name
        from skipit.compressor.loading import input_device  # a dispatched model's first parameter may be on "meta"

        self.device = str(input_device(model))
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        self._cuda = self.device.startswith("cuda")
        self._cuda_peak = 0

    def _timed(self, fn: Callable[[], Any]) -> float:
        import torch

        if not self._cuda:
            self._memory_before()
            start = time.perf_counter()
            with torch.inference_mode():
                fn()
            elapsed = time.perf_counter() - start
            self._memory_after()
            return elapsed
        torch.cuda.reset_peak_memory_stats(self.device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        with torch.inference_mode():
            fn()
        end.record()
        end.synchronize()
        self._cuda_peak = max(self._cuda_peak, int(torch.cuda.max_memory_allocated(self.device)))
        return begin.elapsed_time(end) / 1000.0

    def _ids(self, input_ids: np.ndarray) -> Any:
        import torch

        return torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=self.device)

    def prefill(self, input_ids: np.ndarray) -> float:
        ids = self._ids(input_ids)
        return self._timed(lambda: self.model(input_ids=ids, use_cache=False))

    def decode(self, input_ids: np.ndarray, n_tokens: int) -> float:
        import torch

        # transformers ≥ 5.24 calls the KV cache ``cache`` (argument and output); earlier 5.x ``past_key_values``
        kwarg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        with torch.inference_mode():
            out = self.model(input_ids=self._ids(input_ids), use_cache=True)
        state = {"out": out}

        def steps() -> None:
            for _ in range(n_tokens):
                o = state["out"]
                cache = o.cache if getattr(o, "cache", None) is not None else o.past_key_values
                state["out"] = self.model(input_ids=o.logits[:, -1:].argmax(-1), use_cache=True, **{kwarg: cache})

        return self._timed(steps)

    def peak_memory(self) -> dict[str, Any] | None:
        if self._cuda:
            return {"method": "cuda_max_allocated", "bytes": self._cuda_peak} if self._cuda_peak else None
        return super().peak_memory()


def ort_providers(device: str = "auto") -> list[str]:
    """ONNX Runtime execution providers for ``device`` (``auto``: CUDA when present, else CPU)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.startswith("cuda") or (device == "auto" and "CUDAExecutionProvider" in available):
        if "CUDAExecutionProvider" not in available:
            raise BackendUnavailableError(
                f"ONNX Runtime has no CUDA provider here (available: {', '.join(available)}); "
                "install onnxruntime-gpu (pip install skipit[gpu]) or run on CPU")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtRunner(_RssMemory):
    """An exported decoder graph run by :class:`skipit.exporters.onnx_text.OrtDecoderRunner`, or the split graphs
    of a VLM export (``onnx_path`` is then their folder; text prompts through embeddings → decoder, run by
    :class:`skipit.exporters.onnx_vlm.OrtVlmRunner`, as :class:`TorchRunner` runs a VLM on text).

    ``threads`` sets ONNX Runtime's intra-op threads (default: its own choice); give torch the same
    (``torch.set_num_threads``) for a fair CPU comparison. Its workers stop spinning at the end of each run
    (``session.force_spinning_stop``) unless ``spin_between_runs``: a spinning pool would slow the next runner.
    """

    def __init__(self, onnx_path: str | Path, name: str = "ort", device: str = "auto", vocab_size: int | None = None,
                 threads: int | None = None, spin_between_runs: bool = False) -> None:
        try:
            import onnxruntime as ort

            from skipit.exporters.onnx_text import OrtDecoderRunner
            from skipit.exporters.onnx_vlm import OrtVlmRunner, find_split_export
        except ImportError as exc:
            raise BackendUnavailableError(
                f"the ONNX Runtime runner is not available ({exc}); install skipit[onnx]") from None
        providers = ort_providers(device)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spin_between_runs:
            # ORT's intra-op workers spin-wait after each run by default, burning a core for tens of milliseconds
            # (measured: benchmarks/speed.py); the runner measured next would pay for it. Spin within a run only.
            options.add_session_config_entry("session.force_spinning_stop", "1")
        split = find_split_export(onnx_path)
        if split is not None:
            self.runner = OrtVlmRunner(split[0], providers=providers, session_options=options, onnx_dir=split[1])
            decoder = self.runner.decoder
        else:
            self.runner = OrtDecoderRunner(onnx_path, providers=providers, session_options=options)
            decoder = self.runner.session
        self.name = name
        self.device = "cuda" if providers[0].startswith("CUDA") else "cpu"
        graph_vocab = decoder.get_outputs()[0].shape[-1]
        self.vocab_size = int(vocab_size or (graph_vocab if isinstance(graph_vocab, int) else 0))

    def _timed(self, fn: Callable[[], Any]) -> float:
        self._memory_before()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        self._memory_after()
        return elapsed

    def prefill(self, input_ids: np.ndarray) -> float:
        ids = np.asarray(input_ids, dtype=np.int64)
        return self._timed(lambda: self.runner.forward(ids))

    def decode(self, input_ids: np.ndarray, n_tokens: int) -> float:
        logits, present = self.runner.forward(np.asarray(input_ids, dtype=np.int64))
        state = {"logits": logits, "present": present}

        def steps() -> None:
            for _ in range(n_tokens):
                nxt = np.asarray(state["logits"])[:, -1:].argmax(-1).astype(np.int64)
                state["logits"], state["present"] = self.runner.forward(nxt, past=state["present"])

        return self._timed(steps)


# ----------------------------------------------------------------------------------------------
# measurement


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
    order = {"rotate": rotate, "settle_s": settle_s}
    prefill = {n: _interleaved(runners, rounds, warmup, {"phase": "prefill", "seq_len": n},
                               lambda r, n=n: r.prefill(ids[:, :n]), schedule, **order) for n in seq_lens}
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
