"""Backend parity: an exported ONNX decoder run by ONNX Runtime against the slim torch model it came from.

Compares teacher-forced logits on the first few text samples (:func:`~skipit.validators.compare.compare_logits`:
the tolerance that would have been needed) and greedy continuations from a prompt cut out of each of
them (:func:`~skipit.validators.compare.compare_generation`); both sides stop at the model's EOS.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from skipit.errors import ExportError, InvalidOptionError
from skipit.validators.compare import GenerationComparison, LogitComparison, compare_generation, compare_logits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendParityConfig:
    """How much to compare: ``samples`` text samples, each cut to ``max_tokens``; ``new_tokens`` greedy tokens."""

    samples: int = 4
    max_tokens: int = 64
    new_tokens: int = 16
    atol: float = 1e-3
    device: str = "auto"


@dataclass
class BackendParity:
    onnx_path: str
    logits: LogitComparison
    generation: GenerationComparison

    def as_dict(self) -> dict[str, Any]:
        return {"onnx_path": self.onnx_path, "logits": self.logits.as_dict(), "generation": self.generation.as_dict()}


def find_onnx(path: str | Path) -> Path:
    """The decoder graph in ``path``: the file itself, ``onnx/model.onnx``, ``model.onnx`` or the only ``*.onnx``."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise InvalidOptionError(f"--onnx {path} does not exist; give the export directory or its .onnx file")
    for candidate in (path / "onnx" / "model.onnx", path / "model.onnx", path / "decoder_model_merged.onnx"):
        if candidate.is_file():
            return candidate
    found = sorted(path.rglob("*.onnx"))
    if len(found) == 1:
        return found[0]
    what = ", ".join(str(p.relative_to(path)) for p in found[:5]) or "none"
    raise InvalidOptionError(f"cannot tell which graph in {path} is the decoder (found: {what}); pass the .onnx file itself")


def ort_runner(onnx_path: Path, device: str = "auto") -> Any:
    """An ``OrtDecoderRunner`` for ``onnx_path`` (raises :class:`BackendUnavailableError` if it cannot exist here)."""
    from skipit.validators.speed import OrtRunner

    return OrtRunner(onnx_path, name="ort", device=device).runner


def backend_parity(slim: Any, processor: Any, samples: Sequence[Any], onnx: str | Path,
                   config: BackendParityConfig = BackendParityConfig()) -> BackendParity:
    """Compare the ONNX graph at ``onnx`` with the torch model ``slim`` on the first text-only ``samples``."""
    import torch

    from skipit.validators.generation import greedy

    path = find_onnx(onnx)
    texts = [s for s in samples if s.image is None][: config.samples]
    if not texts:
        raise InvalidOptionError("ONNX parity compares the text decoder and needs text-only samples; the data has none")
    runner = ort_runner(path, config.device)
    tokenizer = getattr(processor, "tokenizer", processor)
    device = next(slim.parameters()).device
    eos = slim.generation_config.eos_token_id if getattr(slim, "generation_config", None) else None
    eos = tokenizer.eos_token_id if eos is None else eos
    cand, ref, gen_ort, gen_torch = [], [], [], []
    for sample in texts:
        ids = tokenizer(sample.text, return_tensors="np", truncation=True, max_length=config.max_tokens)["input_ids"]
        ids = ids.astype(np.int64)
        try:
            logits, _ = runner.forward(ids)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ExportError(f"ONNX Runtime cannot run {path} on a {ids.shape} prompt: {exc}") from None
        t_ids = torch.as_tensor(ids, device=device)
        with torch.inference_mode():
            expected = slim(input_ids=t_ids, use_cache=False).logits.float().cpu().numpy()
        cand.append(np.asarray(logits, dtype=np.float32).reshape(expected.shape[1:]))
        ref.append(expected[0])
        prompt = ids[:, : max(1, ids.shape[1] // 2)]
        gen_ort.append(runner.generate_greedy(prompt, config.new_tokens, eos_token_id=eos)[0, prompt.shape[1]:].tolist())
        gen_torch.append(greedy(slim, {"input_ids": torch.as_tensor(prompt, device=device),
                                       "attention_mask": torch.ones(prompt.shape, dtype=torch.long, device=device)},
                                config.new_tokens, tokenizer.pad_token_id))
    logit_cmp = compare_logits(np.concatenate(cand), np.concatenate(ref), atol=config.atol)
    log.info("ONNX parity: max |Δlogit| %.3g, top-1 %.4f", logit_cmp.max_abs, logit_cmp.top1_agreement)
    return BackendParity(str(path), logit_cmp, compare_generation(gen_ort, gen_torch))

