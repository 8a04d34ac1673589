"""Calibration data: read JSONL (or the built-in set), split it, and encode it with modality masks.

A JSONL line is ``{"text": ...}`` or ``{"image": "relative/path.png", "text": ...}`` with an optional
``"answer"``. Images resolve relative to the file and must stay inside its folder. The data is split
deterministically (20 % / 40 % / 40 %) into ``calibration`` (scores and layer choice), ``holdout`` (the
certificate's verification, never used for choosing) and ``test`` (untouched, for ``skipit validate``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from skipit.errors import CalibrationDataError

log = logging.getLogger(__name__)

SPLITS = ("calibration", "holdout", "test")


@dataclass(frozen=True)
class Sample:
    """One calibration example. ``image`` is a PIL image or None; ``origin`` says where it came from."""

    text: str
    image: Any = None
    answer: str | None = None
    origin: str = ""


@dataclass
class CalibrationSet:
    """Samples plus a fixed split into calibration / holdout / test (indices into ``samples``)."""

    samples: list[Sample]
    splits: dict[str, list[int]]
    description: str
    source: str

    def split(self, name: str) -> list[Sample]:
        """The samples of one split (``calibration``, ``holdout`` or ``test``)."""
        return [self.samples[i] for i in self.splits[name]]

    def describe(self) -> dict[str, Any]:
        """A JSON-able record of what the data was, for the manifest and certificate."""
        digest = hashlib.sha256("\x00".join(s.text for s in self.samples).encode()).hexdigest()[:16]
        return {
            "source": self.source,
            "description": self.description,
            "samples": len(self.samples),
            "with_images": sum(s.image is not None for s in self.samples),
            "split_sizes": {k: len(v) for k, v in self.splits.items()},
            "split_indices": self.splits,
            "text_sha256_16": digest,
        }


def _split(n: int, fractions: Sequence[float], seed: int) -> dict[str, list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_cal = max(1, round(n * fractions[0]))
    n_hold = max(1, round(n * fractions[1]))
    if n_cal + n_hold >= n:
        raise CalibrationDataError(
            f"{n} samples are too few to split into calibration, holdout and test parts; give at least 6 lines"
        )
    return {
        "calibration": sorted(order[:n_cal]),
        "holdout": sorted(order[n_cal:n_cal + n_hold]),
        "test": sorted(order[n_cal + n_hold:]),
    }


def _open_image(path: Path, lineno: int, file: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise CalibrationDataError(f"{file}:{lineno}: image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise CalibrationDataError(f"{file}:{lineno}: {path} is not a readable image ({exc})") from None


def read_jsonl(path: Path) -> list[Sample]:
    """Parse a calibration JSONL file; every problem names its line number."""
    if not path.is_file():
        raise CalibrationDataError(f"calibration file {path} does not exist")
    root = path.parent.resolve()
    samples = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise CalibrationDataError(f"{path}:{lineno}: not valid JSON ({exc.args[0]})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"].strip():
            raise CalibrationDataError(
                f'{path}:{lineno}: each line must be an object with a non-empty "text" string, e.g. {{"text": "..."}}'
            )
        image = None
        if record.get("image") is not None:
            image_path = (root / str(record["image"])).resolve()
            if not image_path.is_relative_to(root):
                raise CalibrationDataError(
                    f"{path}:{lineno}: image path {record['image']!r} escapes the data folder {root}; "
                    "keep images inside the folder of the JSONL file"
                )
            image = _open_image(image_path, lineno, path)
        answer = record.get("answer")
        samples.append(Sample(record["text"], image, None if answer is None else str(answer), f"{path.name}:{lineno}"))
    if not samples:
        raise CalibrationDataError(f"{path} has no samples")
    return samples


def builtin_samples(with_images: bool, seed: int = 0) -> list[Sample]:
    """The built-in set: prose shipped with skipit, plus drawn images with questions for VLMs."""
    from skipit.compressor import builtin

    samples = [Sample(r["text"], None, None, f"builtin:prose:{r.get('domain', '')}") for r in builtin.prose_records()]
    if with_images:
        images = builtin.image_records(len(samples) // 2, seed=seed)
        samples += [Sample(r["text"], r["image"], r["answer"], f"builtin:image:{r['kind']}") for r in images]
    return samples


def load_calibration(
    path: str | Path | None = None,
    *,
    with_images: bool = False,
    fractions: Sequence[float] = (0.2, 0.4),
    seed: int = 0,
    limit: int | None = None,
) -> CalibrationSet:
    """Load calibration data from ``path`` (JSONL) or the built-in set, and split it.

    ``fractions`` are the calibration and holdout shares; the rest is the test split. ``limit`` caps
    the number of samples (taken after a seeded shuffle, so every domain stays represented).
    """
    if path is None:
        samples = builtin_samples(with_images, seed)
        source, description = "builtin", "skipit built-in English prose" + (" + drawn images with questions" if with_images else "")
    else:
        samples = read_jsonl(Path(path))
        source, description = str(path), f"user data {Path(path).name}"
    if limit is not None and len(samples) > limit:
        rng = random.Random(seed)
        samples = [samples[i] for i in sorted(rng.sample(range(len(samples)), limit))]
    return CalibrationSet(samples, _split(len(samples), fractions, seed), description, source)


@dataclass
class Batch:
    """Encoded model inputs plus boolean masks [batch, seq] of text and vision token positions."""

    inputs: dict[str, Any]
    text_mask: Any
    vision_mask: Any
    sample_ids: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.text_mask.shape[0])


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
    device: str = "cpu",
) -> list[Batch]:
    """Tokenize samples into padded batches with text/vision masks (padding is in neither).

    Image samples are encoded one per batch (processors differ in how they batch images); long texts
    are truncated to ``max_length`` tokens. Sample ids follow the order of ``samples``.
    """
    import torch

    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    image_token = spec.image_token_id
    batches = []
    for group in _groups(samples, batch_size):
        ids = [i for i, _ in group]
        items = [s for _, s in group]
        images = [s.image for s in items if s.image is not None]
        texts = [_prompt(s, processor, spec.arch.image_prompt) for s in items]
        if images:
            inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
        else:
            inputs = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
        valid = inputs["attention_mask"].bool()
        vision = (inputs["input_ids"] == image_token) & valid if image_token is not None else torch.zeros_like(valid)
        batches.append(Batch(inputs, valid & ~vision, vision, ids))
    return batches


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
