"""What every runner shares: the :class:`Runner` protocol the speed measurement times, the
:class:`StepDecoder` protocol of a model that decodes with a KV cache, the one greedy loop over it, and
host-side timing and memory.

Runners time themselves (Polygraphy's idea: each backend knows when its work is done): CUDA work with
``torch.cuda.Event`` pairs, host work (onnxruntime, TensorRT through Polygraphy, whose outputs are on the host
when a call returns) with ``time.perf_counter``.

Memory on the host is the growth of the process' resident memory across the runner's calls (psutil; without
it the growth of the lifetime peak from ``resource.getrusage``) — a rough, lower-bound figure, since runners
share the process.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from skipit.errors import InvalidOptionError


class Runner(Protocol):
    """What :func:`skipit.validators.speed.measure_speed` needs from a backend."""

    name: str
    device: str
    vocab_size: int

    def prefill(self, input_ids: np.ndarray) -> float:
        """One forward over ``input_ids`` [1, T] without a cache; seconds."""

    def decode(self, input_ids: np.ndarray, n_tokens: int) -> float:
        """Prefill ``input_ids`` (not timed), then ``n_tokens`` greedy cached steps; seconds for the steps."""

    def peak_memory(self) -> dict[str, Any] | None:
        """``{"method": str, "bytes": int}`` observed so far, or None where it cannot be measured."""


class StepDecoder(Protocol):
    """A model that decodes with a KV cache, one call per step; ``state`` is the decoder's own (cache, mask …).

    ``logits`` are [batch, seq, vocab] arrays (numpy, or torch tensors for torch).
    """

    def start(self, input_ids: Any, attention_mask: Any = None, inputs: Mapping[str, Any] | None = None
              ) -> tuple[Any, Any]:
        """Run the prompt (``inputs``: e.g. a VLM's pixel inputs); return (logits, state)."""

    def advance(self, next_ids: Any, state: Any) -> tuple[Any, Any]:
        """Run ``next_ids`` [batch, 1] after ``state`` (every row attends to it); return (logits, new state)."""


def host(value: Any) -> np.ndarray:
    """A numpy array of a numpy array, torch tensor (any device) or list."""
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def greedy_decode(decoder: StepDecoder, input_ids: Any, max_new_tokens: int, *, attention_mask: Any = None,
                  inputs: Mapping[str, Any] | None = None, eos_token_id: int | Sequence[int] | None = None,
                  pad_token_id: int | None = None, started: tuple[Any, Any] | None = None) -> np.ndarray:
    """Greedy decoding with the KV cache, like transformers' ``generate(do_sample=False)``: every backend's loop.

    Returns prompt + new tokens [batch, prompt + n] (int64). With ``eos_token_id``, a finished row is continued
    with ``pad_token_id`` (default: the first EOS id) and decoding stops when every row has finished, so the
    result can be shorter than ``max_new_tokens``. ``started``: the (logits, state) of a prompt already run
    (the speed measurement times only the steps). Without EOS ids the next tokens stay where the logits are
    (no host round trip per step on a GPU).
    """
    if max_new_tokens < 0:
        raise InvalidOptionError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
    tokens = host(input_ids).astype(np.int64)
    if max_new_tokens == 0:
        return tokens
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    done = np.zeros(tokens.shape[0], dtype=bool)
    logits, state = started if started is not None else decoder.start(input_ids, attention_mask, inputs)
    new: list[Any] = []
    for step in range(max_new_tokens):
        nxt = logits[:, -1, :].argmax(-1)
        if eos:
            nxt = np.where(done, pad, host(nxt)).astype(np.int64)
            done |= np.isin(nxt, eos)
        new.append(nxt)
        if (eos and done.all()) or step == max_new_tokens - 1:
            break
        logits, state = decoder.advance(nxt[:, None], state)
    if hasattr(new[0], "detach"):  # torch: one copy to the host at the end
        import torch

        generated = host(torch.stack(new, dim=1))
    else:
        generated = np.stack(new, axis=1)
    return np.concatenate([tokens, generated.astype(np.int64)], axis=1)


class RssMemory:
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

    def _host_timed(self, fn: Callable[[], Any]) -> float:
        """Seconds ``fn()`` takes by the host clock (its work is done when it returns), memory tracked."""
        self._memory_before()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        self._memory_after()
        return elapsed


class HostTimedRunner(RssMemory):
    """A :class:`Runner` over any :class:`StepDecoder` whose calls return with their work done (onnxruntime,
    TensorRT through Polygraphy): prefill = the prompt through ``decoder.start``, decode = the greedy loop."""

    def __init__(self, decoder: StepDecoder, name: str, device: str, vocab_size: int) -> None:
        self.decoder = decoder
        self.name = name
        self.device = device
        self.vocab_size = vocab_size

    def prefill(self, input_ids: np.ndarray) -> float:
        ids = np.asarray(input_ids, dtype=np.int64)
        return self._host_timed(lambda: self.decoder.start(ids))

    def decode(self, input_ids: np.ndarray, n_tokens: int) -> float:
        ids = np.asarray(input_ids, dtype=np.int64)
        started = self.decoder.start(ids)
        return self._host_timed(lambda: greedy_decode(self.decoder, ids, n_tokens + 1, started=started))
