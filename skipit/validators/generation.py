"""Greedy generation prompts for parity checks, and answer matching for task accuracy (the generation itself:
:func:`skipit.runtime.torch_runner.hf_greedy`, :func:`skipit.runtime.base.greedy_decode`).

A prompt is cut from the sample's own encoding (the same :func:`~skipit.compressor.calibration.encode`
the certificate used), so text and image+text samples are handled alike:

* a sample with an ``answer`` is encoded as calibration encodes it (``"<text> Answer: <answer>"``) and
  cut where the answer begins (the common prefix with the encoding of ``"<text> Answer:"``), so
  the continuation can be checked against the answer;
* a sample without one is cut after ``prompt_fraction`` of its tokens (at most ``max_prompt_tokens``),
  and never inside the image tokens.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, replace
from typing import Any, Sequence

#: Input keys with one entry per token; a prompt cut slices them (pixel values etc. stay whole).
_PER_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "position_ids")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass
class Prompt:
    """Model inputs (batch of one) for a greedy continuation, and the answer it should produce if known."""

    sample_id: int
    inputs: dict[str, Any]
    answer: str | None


def _cut(inputs: dict[str, Any], k: int) -> dict[str, Any]:
    return {key: v[:, :k] if key in _PER_TOKEN_KEYS and hasattr(v, "dim") and v.dim() >= 2 else v
            for key, v in inputs.items()}


def _common_prefix(a: Any, b: Any) -> int:
    n = min(a.shape[-1], b.shape[-1])
    diff = (a[0, :n] != b[0, :n]).nonzero()
    return int(diff[0]) if len(diff) else n


def build_prompts(
    samples: Sequence[Any], processor: Any, spec: Any, *, prompt_fraction: float = 0.5, max_prompt_tokens: int = 64,
    max_length: int = 128, device: str = "cpu",
) -> list[Prompt]:
    """One generation prompt per sample (see the module docstring); sample ids follow ``samples``."""
    from skipit.compressor.batches import encode

    def one(sample: Any) -> Any:
        return encode([sample], processor, spec, batch_size=1, max_length=max_length, device=device)[0]

    prompts = []
    for i, sample in enumerate(samples):
        full = one(sample)
        ids = full.inputs["input_ids"]
        if sample.answer is not None:
            bare = one(replace(sample, text=f"{sample.text} Answer:", answer=None))
            k = _common_prefix(ids, bare.inputs["input_ids"])
        else:
            n_valid = int(full.inputs["attention_mask"][0].sum())
            k = min(max_prompt_tokens, max(1, round(n_valid * prompt_fraction)))
        vision = full.vision_mask[0].nonzero()
        if len(vision):
            k = max(k, int(vision[-1]) + 1)
        prompts.append(Prompt(i, _cut(full.inputs, max(1, k)), sample.answer))
    return prompts


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization: first line, lower case, no punctuation or articles, single spaces."""
    text = (text.strip().splitlines() or [""])[0].lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_matches(continuation: str, answer: str) -> bool:
    """Whether the continuation's first line starts with the answer, word for word, after normalization.

    ``"Blue. The sky ..."`` matches ``"blue"``; ``"blueish"`` does not. Continuations run for a fixed
    number of tokens, so requiring the whole line to equal the answer would punish the model for
    going on talking.
    """
    want = normalize_answer(answer).split()
    return bool(want) and normalize_answer(continuation).split()[: len(want)] == want
