"""Data loader of the ``skipit_facts`` lm-eval task: the JSONL beside this file, no hub involved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).with_name("facts.jsonl")


def load_facts(**_: Any) -> dict[str, Any]:
    """``{"test": Dataset}`` of the shipped questions (lm-eval passes its task metadata as keywords)."""
    import datasets

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}
