"""Built-in calibration data, used when the user gives no calibration file.

* :func:`prose_records` - original English paragraphs over a dozen everyday domains (science,
  history, recipes, code docs, legal terms, news, fiction, dialogue, travel, health, finance,
  how-to, descriptive writing, maths), shipped as ``prose.jsonl`` inside the package.
* :func:`image_records` - procedurally drawn pictures (shapes, bar charts, signs, clocks, tables,
  grids) with a question and its answer, for vision-language models.

Importing this module is light: Pillow and numpy only, no torch.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from skipit.compressor.builtin.images import COLORS, KINDS, draw_record, image_records

__all__ = ["prose_records", "image_records", "draw_record", "KINDS", "COLORS"]

_PROSE_FILE = "prose.jsonl"


@functools.lru_cache(maxsize=1)
def _prose_lines() -> tuple[str, ...]:
    text = resources.files(__name__).joinpath(_PROSE_FILE).read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line.strip())


def prose_records() -> list[dict[str, Any]]:
    """The built-in prose: a fresh list of ``{"text": str, "domain": str}`` dicts, in file order.

    The file interleaves domains, so any prefix of the list is spread over all of them. Read with
    :mod:`importlib.resources`, so it works from a source checkout and from an installed wheel.
    """
    return [json.loads(line) for line in _prose_lines()]
