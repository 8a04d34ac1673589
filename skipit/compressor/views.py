"""Read-through sequences: the views over batches and reference files say how many items they hold and how
item ``i`` is read; indexing (negative indices, bounds, slices as lists) and iteration are done here once."""

from __future__ import annotations

from typing import Any, Iterator, Sequence, TypeVar

T = TypeVar("T")


class IndexedView(Sequence[T]):
    """A sequence whose items are read on demand by :meth:`_read` (subclasses define it and ``__len__``)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def _read(self, i: int) -> T:
        raise NotImplementedError

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._read(j) for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        return self._read(i % n)

    def __iter__(self) -> Iterator[T]:
        for i in range(len(self)):
            yield self._read(i)
