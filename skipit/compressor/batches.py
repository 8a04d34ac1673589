"""Encoded calibration batches: samples tokenized (and images processed) when a pass reads them, with
boolean masks of text and vision token positions; views of a prefix of the batches for screening."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

from skipit.compressor.calibration import CHARS_PER_TOKEN, Sample
from skipit.compressor.views import IndexedView

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Encoded model inputs plus boolean masks [batch, seq] of text and vision token positions."""

    inputs: dict[str, Any]
    text_mask: Any
    vision_mask: Any
    sample_ids: list[int] = field(default_factory=list)
    #: each sample's :attr:`Sample.domain` (None when unknown)
    domains: list[str | None] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.text_mask.shape[0])

    def cut(self, rows: int) -> "Batch":
        """The first ``rows`` samples of this batch, padding kept as it is (so their outputs do not change)."""
        if rows >= self.size:
            return self
        size = self.size
        inputs = {k: v[:rows] if hasattr(v, "shape") and tuple(v.shape[:1]) == (size,) else v
                  for k, v in self.inputs.items()}
        return Batch(inputs, self.text_mask[:rows], self.vision_mask[:rows], list(self.sample_ids[:rows]),
                     list(self.domains[:rows]))


class LazyBatch(Batch):
    """A :class:`Batch` of :class:`EncodedBatches`: ``size``, ``sample_ids`` and ``domains`` are known at once;
    the tensors are encoded (and moved to the device) on first use and live as long as this object."""

    def __init__(self, encoder: "_Encoder", group: list[tuple[int, Sample]]) -> None:  # noqa: D107 - no dataclass init
        self._encoder, self._group = encoder, group
        self._encoded: Batch | None = None
        self.sample_ids = [i for i, _ in group]
        self.domains = [smp.domain for _, smp in group]

    def _get(self) -> Batch:
        if self._encoded is None:
            self._encoded = self._encoder(self._group)
        return self._encoded

    inputs = property(lambda self: self._get().inputs)
    text_mask = property(lambda self: self._get().text_mask)
    vision_mask = property(lambda self: self._get().vision_mask)

    @property
    def size(self) -> int:
        return len(self._group)

    def cut(self, rows: int) -> Batch:
        return self._get().cut(rows) if rows < self.size else self

    def __repr__(self) -> str:
        return f"LazyBatch(sample_ids={self.sample_ids}, encoded={self._encoded is not None})"


def fit_text(text: str, tokenizer: Any, max_length: int) -> str:
    """``text`` cut to a prefix that still holds more than ``max_length`` tokens, so that truncating it gives
    the ids truncating the whole text would, without tokenizing megabytes.

    The first cut keeps ``max_length * CHARS_PER_TOKEN`` characters; in the rare text whose tokens are
    longer than that on average (long runs merged into single tokens) the cut grows until it holds enough.
    """
    limit = max_length * CHARS_PER_TOKEN
    while len(text) > limit:
        cut = text[:limit]
        if len(tokenizer(cut, add_special_tokens=False)["input_ids"]) > max_length:
            return cut
        limit *= 4
    return text


def _prompt(sample: Sample, processor: Any, image_prompt: str) -> str:
    text = sample.text if sample.answer is None else f"{sample.text} Answer: {sample.answer}"
    if sample.image is None:
        return text
    template = getattr(processor, "chat_template", None)
    if template:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=False)
    return image_prompt.format(text=text)


def encode(
    samples: Sequence[Sample],
    processor: Any,
    spec: Any,
    *,
    batch_size: int = 8,
    max_length: int = 128,
    device: Any = "cpu",
    ids: Sequence[int] | None = None,
) -> "EncodedBatches":
    """Padded batches with text/vision masks (padding is in neither), encoded batch by batch on use.

    Nothing is tokenized here: :class:`EncodedBatches` encodes a batch (tokens, and images through the
    processor) and moves it to ``device`` when it is read, so memory holds the batches in use, not the
    split. Image samples are encoded one per batch (processors differ in how they batch images); long
    texts are cut (:func:`fit_text`) and truncated to ``max_length`` tokens. Sample ids follow the order
    of ``samples``, or are ``ids[i]`` for ``samples[i]`` (e.g. indices into the whole calibration set).
    """
    if ids is not None and len(ids) != len(samples):
        raise ValueError(f"{len(ids)} ids for {len(samples)} samples")
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    named = list(zip(range(len(samples)) if ids is None else ids, samples))
    groups = [[named[i] for i, _ in group] for group in _groups(samples, batch_size)]
    return EncodedBatches(groups, _Encoder(processor, spec, max_length, device))


@dataclass
class _Encoder:
    """Encodes one group of samples into a :class:`Batch` on ``device``."""

    processor: Any
    spec: Any
    max_length: int
    device: Any

    def __call__(self, group: list[tuple[int, Sample]]) -> Batch:
        import torch

        processor = self.processor
        tokenizer = getattr(processor, "tokenizer", processor)
        items = [replace(s, text=fit_text(s.text, tokenizer, self.max_length)) for _, s in group]
        images = [s.image for s in items if s.image is not None]
        texts = [_prompt(s, processor, self.spec.arch.image_prompt) for s in items]
        if images:
            inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
        else:
            inputs = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        valid = inputs["attention_mask"].bool()
        image_token = self.spec.image_token_id
        vision = (inputs["input_ids"] == image_token) & valid if image_token is not None else torch.zeros_like(valid)
        return Batch(inputs, valid & ~vision, vision, [i for i, _ in group], [s.domain for s in items])


class EncodedBatches(Sequence[Batch]):
    """The batches of a split, encoded one at a time when read (see :func:`encode`).

    ``len``, iteration, indexing and slicing (``batches[:n]``, another :class:`EncodedBatches`) work as on
    a list; each read returns a new :class:`LazyBatch`, so nothing stays in memory after its use.
    ``n_samples`` and :meth:`domains` need no encoding.
    """

    def __init__(self, groups: list[list[tuple[int, Sample]]], encoder: _Encoder) -> None:
        self._groups, self._encoder = groups, encoder

    def __len__(self) -> int:
        return len(self._groups)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return EncodedBatches(self._groups[i], self._encoder)
        return LazyBatch(self._encoder, self._groups[i])

    def __iter__(self) -> Iterator[Batch]:
        for group in self._groups:
            yield LazyBatch(self._encoder, group)

    @property
    def n_samples(self) -> int:
        return sum(len(g) for g in self._groups)

    def domains(self) -> list[str | None]:
        """Each sample's domain, in batch order."""
        return [smp.domain for g in self._groups for _, smp in g]

    def __repr__(self) -> str:
        return f"EncodedBatches({len(self)} batches, {self.n_samples} samples, device={self._encoder.device})"


class BatchPrefix(IndexedView[Batch]):
    """The first ``n`` samples of a sequence of batches (the last batch cut, its padding kept), read through."""

    def __init__(self, batches: Sequence[Batch], n: int) -> None:
        self.batches, self.n_samples = batches, 0
        self.last_rows = 0
        count = 0
        for b in batches:
            if self.n_samples >= n:
                break
            self.last_rows = min(b.size, n - self.n_samples)
            self.n_samples += self.last_rows
            count += 1
        self._len = count

    def __len__(self) -> int:
        return self._len

    def _read(self, i: int) -> Batch:
        batch = self.batches[i]
        return batch.cut(self.last_rows) if i == self._len - 1 else batch

    def domains(self) -> list[str | None]:
        return [d for i in range(self._len) for d in self._meta(i)]

    def _meta(self, i: int) -> list[str | None]:
        domains = self.batches[i].domains
        return list(domains[: self.last_rows]) if i == self._len - 1 else list(domains)


def count_samples(batches: Sequence[Batch]) -> int:
    """Samples in ``batches`` (a list of batches or :class:`EncodedBatches`), without encoding any."""
    n = getattr(batches, "n_samples", None)
    return int(n) if n is not None else sum(b.size for b in batches)


def batch_domains(batches: Sequence[Batch]) -> list[str | None]:
    """Each sample's domain in batch order, without encoding (for :class:`EncodedBatches`)."""
    domains = getattr(batches, "domains", None)
    return list(domains()) if callable(domains) else [d for b in batches for d in b.domains]


def _groups(samples: Sequence[Sample], batch_size: int) -> Iterator[list[tuple[int, Sample]]]:
    text_group: list[tuple[int, Sample]] = []
    for i, s in enumerate(samples):
        if s.image is not None:
            yield [(i, s)]
            continue
        text_group.append((i, s))
        if len(text_group) == batch_size:
            yield text_group
            text_group = []
    if text_group:
        yield text_group
