"""The original model's next-token distributions, kept exact on disk instead of in RAM.

A verification pass compares the slim model with the *original's* log-probabilities at every text
position of a split (KL(original ‖ slim) needs the whole distribution: lumping the tail, or keeping
the top-k, can only lower it, which a certificate must never do). For a 152k vocabulary that is
~300 KB per token in fp16: 4 GB for the default held-out split, ~80 GB for 1,000 samples × 512
tokens — more than RAM. So :class:`ReferenceStore` writes each batch's fp16 log-probs and top-1 ids
to a file as the pass produces them and reads one batch back at a time: RAM holds one batch, the
numbers are the ones the in-memory reference held (bit for bit), and the cost is disk space
(``2 · vocab`` bytes per text token plus 8 for the top-1 id) and one sequential read per later pass.

The file lies in :func:`scratch_folder` (the pipeline points it beside the output, inside the
run's staging folder, so that an interrupted run's files are removed with it; elsewhere the system
temporary folder, i.e. ``$TMPDIR``) and is deleted when the store is closed or garbage-collected.

A store is a sequence of ``(logp fp16 [n_text, vocab], top1 int64 [n_text])`` pairs on the CPU, one
per batch of the pass that made it, which is what :func:`~skipit.compressor.analyze.run_pass`
(``reference=``), healing (``HealData.teacher``) and the parity checks read. :meth:`ReferenceStore.cut`
gives the first samples of it (the certifier's screening subset) without copying anything.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from skipit.compressor.views import IndexedView

_SCRATCH: contextvars.ContextVar[Path | None] = contextvars.ContextVar("skipit_scratch", default=None)


@contextlib.contextmanager
def scratch_folder(path: str | os.PathLike[str] | None) -> Iterator[Path | None]:
    """Within the block, reference stores (and other spill files) are created in ``path`` (None: the default)."""
    folder = None if path is None else Path(path)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    token = _SCRATCH.set(folder)
    try:
        yield folder
    finally:
        _SCRATCH.reset(token)


def current_scratch() -> Path | None:
    """The folder set by :func:`scratch_folder`, or None (the system temporary folder)."""
    return _SCRATCH.get()


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class ReferenceStore(IndexedView[tuple[Any, Any]]):
    """Per-batch reference log-probs (fp16) and top-1 ids, spilled to one file; see the module docstring."""

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        folder = folder if folder is not None else current_scratch()
        fd, self.path = tempfile.mkstemp(prefix="skipit-reference-", suffix=".bin", dir=folder)
        self._file = os.fdopen(fd, "w+b", buffering=0)
        self._finalizer = weakref.finalize(self, _close_and_unlink, self._file, self.path)
        #: per batch: (byte offset, text tokens, vocabulary, text tokens per sample row)
        self._index: list[tuple[int, int, int, np.ndarray]] = []
        self._end = 0

    # -- writing --------------------------------------------------------------------------------
    def append(self, logp: Any, top1: Any, row_counts: Any) -> None:
        """Add one batch: ``logp`` [n_text, vocab] (any float dtype; stored as fp16), ``top1`` [n_text] ids,
        ``row_counts`` [batch] text tokens per sample row (they sum to n_text, in row order)."""
        with self.batch(row_counts) as batch:
            batch.write(logp, top1)

    @contextlib.contextmanager
    def batch(self, row_counts: Any) -> Iterator["_BatchWriter"]:
        """Add one batch a slice of text tokens at a time: ``write(logp, top1)`` for consecutive slices, in
        order; the batch is recorded when the block ends (and checked against ``row_counts``)."""
        counts = np.asarray(row_counts.detach().cpu() if hasattr(row_counts, "detach") else row_counts, dtype=np.int64)
        writer = _BatchWriter(self, self._end)
        yield writer
        n, vocab = writer.finish()
        if int(counts.sum()) != n:
            raise ValueError(f"reference batch: {n} log-prob rows and {int(counts.sum())} text tokens by row disagree")
        self._index.append((self._end, n, vocab, counts))
        self._end += n * vocab * 2 + n * 8

    def _write_at(self, offset: int, part: Any) -> None:
        import torch

        self._file.seek(offset)
        view = memoryview(part.view(torch.uint8).numpy()).cast("B") if part.numel() else memoryview(b"")
        while view:  # a raw file may write less than asked
            view = view[self._file.write(view):]

    # -- reading --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    def _read(self, i: int) -> tuple[Any, Any]:
        return self.read(i)

    def read(self, i: int, rows: int | None = None) -> tuple[Any, Any]:
        """Batch ``i`` as CPU tensors (fp16 log-probs, int64 top-1), or only its first ``rows`` sample rows."""
        import torch

        offset, n, vocab, counts = self._index[i]
        take = n if rows is None else int(counts[:rows].sum())
        logp = torch.empty((take, vocab), dtype=torch.float16)
        top1 = torch.empty(take, dtype=torch.int64)
        self._read_into(offset, logp)
        self._read_into(offset + n * vocab * 2, top1)
        return logp, top1

    def _read_into(self, offset: int, out: Any) -> None:
        import torch

        if not out.numel():
            return
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        self._file.seek(offset)
        done = 0
        while done < len(view):
            got = self._file.readinto(view[done:])
            if not got:
                raise OSError(f"reference file {self.path} is shorter than expected (was it removed?)")
            done += got

    def row_counts(self, i: int) -> np.ndarray:
        """Text tokens per sample row of batch ``i``."""
        return self._index[i][3]

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        return self._end

    def cut(self, batches: int, last_rows: int | None = None) -> "ReferenceView":
        """The first ``batches`` batches, the last of them cut to its first ``last_rows`` sample rows."""
        return ReferenceView(self, batches, last_rows)

    def close(self) -> None:
        """Delete the file (also done when the store is garbage-collected)."""
        self._finalizer()

    def __enter__(self) -> "ReferenceStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_and_unlink(file: Any, path: str) -> None:
    with contextlib.suppress(OSError):
        file.close()
    _unlink(path)


class _BatchWriter:
    """Writes one batch's fp16 log-probs slice by slice; the top-1 ids (small) follow them at :meth:`finish`."""

    def __init__(self, store: ReferenceStore, offset: int) -> None:
        self.store, self.offset = store, offset
        self.rows, self.vocab = 0, 0
        self.top1: list[Any] = []

    def write(self, logp: Any, top1: Any) -> None:
        """The next ``logp`` [n, vocab] (any float dtype) and their top-1 ids [n]."""
        import torch

        half = logp.detach().to("cpu", torch.float16).contiguous()
        ids = top1.detach().to("cpu", torch.int64).contiguous()
        n, vocab = (int(half.shape[0]), int(half.shape[1])) if half.dim() == 2 else (0, 0)
        if int(ids.shape[0]) != n or (n and self.rows and vocab != self.vocab):
            raise ValueError(f"reference batch: {n} log-prob rows of {vocab} and {int(ids.shape[0])} top-1 ids "
                             f"(earlier rows: {self.vocab} wide)")
        if n:
            self.store._write_at(self.offset + self.rows * vocab * 2, half)
            self.vocab = vocab
        self.rows += n
        self.top1.append(ids)

    def finish(self) -> tuple[int, int]:
        import torch

        ids = torch.cat(self.top1) if self.top1 else torch.zeros(0, dtype=torch.int64)
        self.store._write_at(self.offset + self.rows * self.vocab * 2, ids)
        return self.rows, self.vocab


class ReferenceView(IndexedView[tuple[Any, Any]]):
    """A prefix of a :class:`ReferenceStore` (see :meth:`ReferenceStore.cut`); reads through to the store."""

    def __init__(self, store: ReferenceStore, batches: int, last_rows: int | None) -> None:
        self.store, self.batches, self.last_rows = store, batches, last_rows

    def __len__(self) -> int:
        return self.batches

    def _read(self, i: int) -> tuple[Any, Any]:
        return self.store.read(i, self.last_rows if i == self.batches - 1 else None)


class Chain(IndexedView[Any]):
    """Several sequences read as one (batches or references), without copying or encoding anything."""

    def __init__(self, *parts: Sequence[Any]) -> None:
        self.parts = [p for p in parts if len(p)]
        self._starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _read(self, i: int) -> Any:
        part = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.parts[part][i - int(self._starts[part])]

    def __iter__(self) -> Iterator[Any]:
        for part in self.parts:
            yield from part
