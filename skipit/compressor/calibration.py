"""Calibration data: read JSONL (or the built-in set) and split it (encoding: :mod:`skipit.compressor.batches`).

A JSONL line is ``{"text": ...}`` or ``{"image": "relative/path.png", "text": ...}`` with an optional
``"answer"``. Images resolve relative to the file and must stay inside its folder. Hostile data is
bounded: the file is read line by line and a line over :data:`MAX_LINE_BYTES` is refused; an image over
:data:`MAX_IMAGE_PIXELS` is refused before it is decoded; each text is cut to what ``max_length``
tokens can use (:data:`CHARS_PER_TOKEN`) before it reaches the tokenizer. The data is split
deterministically, stratified by domain (20 % but at least 16 samples / 40 % / the rest) into
``calibration`` (scores and layer choice), ``holdout`` (the certificate's verification, never used
for choosing) and ``test`` (untouched, for ``skipit validate``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

from skipit.errors import CalibrationDataError, InvalidOptionError

log = logging.getLogger(__name__)

SPLITS = ("calibration", "holdout", "test")
#: Longest calibration line accepted, in bytes (4 MiB). Longer lines are refused rather than read:
#: nothing past the first few thousand characters is ever used (see :data:`CHARS_PER_TOKEN`), and a
#: tokenizer given one multi-megabyte string needs hundreds of bytes of memory per character.
MAX_LINE_BYTES = 4 * 1024 * 1024
#: Characters of text kept per token of ``max_length`` before tokenizing. Every token spans at least one
#: character and English BPE averages about four, so 16 leaves a wide margin: the kept prefix still holds
#: more than ``max_length`` tokens and truncation gives the same ids as on the whole text.
CHARS_PER_TOKEN = 16
#: Largest image accepted, in pixels (8192 × 8192). A PNG can declare 20000 × 20000 in a few bytes and
#: then need gigabytes to decode; processors resize to a few hundred pixels anyway.
MAX_IMAGE_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class DataOptions:
    """Which calibration data, and how it is encoded (the one home of these defaults).

    ``max_length`` caps each text; shorter texts keep their own length (the built-in paragraphs are
    90–159 tokens, so the default 256 never cuts them)."""

    path: Path | None = None
    limit: int | None = None
    batch_size: int = 8
    max_length: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 6:
            raise InvalidOptionError(f"--calib-limit must be ≥ 6 (calibration, holdout and test splits each need "
                                     f"samples), got {self.limit}")
        if self.batch_size < 1:
            raise InvalidOptionError(f"--batch-size must be ≥ 1, got {self.batch_size}")
        if self.max_length < 2:
            raise InvalidOptionError(f"--max-length must be ≥ 2 tokens (a next-token prediction needs two), "
                                     f"got {self.max_length}")


@dataclass(frozen=True)
class Sample:
    """One calibration example. ``image`` is a PIL image or None; ``origin`` says where it came from;
    ``domain`` is the kind of data it is (the built-in set's 15 prose domains, ``image:<kind>``, or a
    JSONL line's ``"domain"``), used for per-domain certificate figures; None when unknown."""

    text: str
    image: Any = None
    answer: str | None = None
    origin: str = ""
    domain: str | None = None


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

    #: the version of :meth:`describe`'s record (records without one are the same shape)
    FORMAT = "skipit-data/1"

    def digest(self) -> str:
        """First 16 hex digits of the SHA-256 of the samples' texts: the same texts in the same order."""
        return hashlib.sha256("\x00".join(s.text for s in self.samples).encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """A JSON-able record of what the data was and how it was split, for the manifest
        (:meth:`restore_splits` reads the splits back)."""
        return {
            "format": self.FORMAT,
            "source": self.source,
            "description": self.description,
            "samples": len(self.samples),
            "with_images": sum(s.image is not None for s in self.samples),
            "split_sizes": {k: len(v) for k, v in self.splits.items()},
            "split_rule": f"seeded, stratified by domain; calibration max(20 %, min({MIN_CALIBRATION}, n/3)), "
                          "holdout 40 %, test the rest",
            "domains": {k: dict(Counter(self.samples[i].domain or "unlabeled" for i in v)) for k, v in self.splits.items()},
            "split_indices": self.splits,
            "text_sha256_16": self.digest(),
        }

    def restore_splits(self, record: dict[str, Any]) -> bool:
        """Take the splits a :meth:`describe` record names, when it describes these very samples; return
        whether it does (same texts in the same order). A record of an unknown format is refused."""
        fmt = record.get("format", self.FORMAT)
        if fmt != self.FORMAT:
            raise InvalidOptionError(f"data record format {fmt!r} is not {self.FORMAT!r}; rerun skipit-compress "
                                     "with this skipit version")
        if record.get("text_sha256_16") != self.digest():
            return False
        if record.get("split_indices"):
            self.splits = {k: list(v) for k, v in record["split_indices"].items()}
        return True


#: The calibration split never has fewer samples than this (or a third of the data, if less): selection
#: and screening on 6 texts of a 32-text file (a plain 20 %) chose measurably worse layers.
MIN_CALIBRATION = 16


def _split(domains: Sequence[str | None], fractions: Sequence[float], seed: int) -> dict[str, list[int]]:
    """Seeded split into calibration / holdout / test, stratified by domain.

    Samples are shuffled within each domain and dealt round-robin across domains, so that every
    prefix of the order holds the domains in proportion; the first ``n_cal`` go to calibration, the
    next ``n_hold`` to holdout, the rest to test. ``n_cal`` is ``fractions[0]`` of the data but at
    least :data:`MIN_CALIBRATION` (at most a third of the data); ``n_hold`` is ``fractions[1]``.
    """
    n = len(domains)
    rng = random.Random(seed)
    groups: dict[str | None, list[int]] = {}
    for i, d in enumerate(domains):
        groups.setdefault(d, []).append(i)
    queues = []
    for key in sorted(groups, key=str):
        members = groups[key]
        rng.shuffle(members)
        queues.append(members)
    order = []
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop())
    n_cal = max(1, round(n * fractions[0]), min(MIN_CALIBRATION, n // 3))
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


def _check_image_file(path: Path, where: str) -> None:
    """Refuse an image path that is missing or not a regular file (opening a FIFO would block forever)."""
    if not path.exists():
        raise CalibrationDataError(f"{where}: image {path} does not exist")
    if not path.is_file():
        raise CalibrationDataError(f"{where}: image {path} is not a regular file (a directory, FIFO or device); "
                                   "point the line at an image file")


def _open_image(path: Path, where: str) -> Any:
    """Decode one image, refusing what is not a regular file or has more than :data:`MAX_IMAGE_PIXELS`."""
    from PIL import Image, UnidentifiedImageError

    _check_image_file(path, where)
    too_big = (f"{where}: image {path} declares more than {MAX_IMAGE_PIXELS:,} pixels (the limit, 8192 × 8192); "
               "scale it down — calibration images are resized to a few hundred pixels anyway")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise CalibrationDataError(f"{too_big} (it is {img.width} × {img.height})")
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise CalibrationDataError(too_big) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:  # PIL raises SyntaxError on bad headers
        raise CalibrationDataError(f"{where}: {path} is not a readable image ({exc})") from None


def _lines(fh: BinaryIO, path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, read one at a time and never more than :data:`MAX_LINE_BYTES`."""
    lineno = 0
    while raw := fh.readline(MAX_LINE_BYTES + 1):
        lineno += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise CalibrationDataError(
                f"{path}:{lineno}: line is longer than {MAX_LINE_BYTES // 2**20} MiB (the limit per line); only the "
                "first few thousand characters of a text are used — shorten it or split it into several lines")
        try:
            yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise CalibrationDataError(
                f"{path}:{lineno}: not UTF-8 text (byte {exc.start} of the line is {raw[exc.start]:#04x}); save the file "
                "as UTF-8") from None


def _image_path(record: dict[str, Any], root: Path, where: str) -> Path:
    image_path = (root / str(record["image"])).resolve()
    if not image_path.is_relative_to(root):
        raise CalibrationDataError(
            f"{where}: image path {record['image']!r} escapes the data folder {root}; "
            "keep images inside the folder of the JSONL file"
        )
    return image_path


def read_jsonl(path: Path, with_images: bool = True) -> list[Sample]:
    """Parse a calibration JSONL file; every problem names its line number.

    With ``with_images=False`` (a text-only model) image lines keep their text, their images are not
    opened, and a warning says how many were ignored.
    """
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a regular file"
        raise CalibrationDataError(f"calibration file {path} {what}; give a JSONL file")
    root = path.parent.resolve()
    samples, ignored = [], []
    with path.open("rb") as fh:
        for lineno, line in _lines(fh, path):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise CalibrationDataError(f"{where}: not valid JSON ({exc.args[0] if exc.args else exc})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"].strip():
                raise CalibrationDataError(
                    f'{where}: each line must be an object with a non-empty "text" string, e.g. {{"text": "..."}}'
                )
            image = None
            if record.get("image") is not None:
                image_path = _image_path(record, root, where)
                if with_images:
                    image = _open_image(image_path, where)
                else:
                    _check_image_file(image_path, where)
                    ignored.append(lineno)
            answer, domain = record.get("answer"), record.get("domain")
            if domain is not None and not (isinstance(domain, str) and domain.strip()):
                raise CalibrationDataError(f'{where}: "domain" must be a non-empty string, e.g. {{"domain": "legal"}}')
            samples.append(Sample(record["text"], image, None if answer is None else str(answer), f"{path.name}:{lineno}",
                                  domain))
    if not samples:
        raise CalibrationDataError(f"{path} has no samples")
    if ignored:
        log.warning("%s: %d of %d lines name an image (first on line %d), but the model is text-only: the images are "
                    "ignored and only their text is used", path, len(ignored), len(samples), ignored[0])
    return samples


def builtin_samples(with_images: bool, seed: int = 0) -> list[Sample]:
    """The built-in set: prose shipped with skipit, plus drawn images with questions for VLMs."""
    from skipit.compressor import builtin

    samples = [Sample(r["text"], None, None, f"builtin:prose:{r.get('domain', '')}", r.get("domain") or None)
               for r in builtin.prose_records()]
    if with_images:
        images = builtin.image_records(len(samples) // 2, seed=seed)
        samples += [Sample(r["text"], r["image"], r["answer"], f"builtin:image:{r['kind']}", f"image:{r['kind']}")
                    for r in images]
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
        source = "builtin"
        description = "skipit built-in English prose" + (" + drawn images with questions" if with_images else "")
    else:
        samples = read_jsonl(Path(path), with_images=with_images)
        source, description = str(path), f"user data {Path(path).name}"
    if limit is not None and len(samples) > limit:
        rng = random.Random(seed)
        samples = [samples[i] for i in sorted(rng.sample(range(len(samples)), limit))]
    return CalibrationSet(samples, _split([smp.domain for smp in samples], fractions, seed), description, source)
