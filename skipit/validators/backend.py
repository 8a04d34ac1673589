"""Backend parity: an exported ONNX model run by ONNX Runtime against the slim torch model it came from.

Compares teacher-forced logits on the first few samples (:func:`~skipit.validators.compare.compare_logits`:
the tolerance that would have been needed) and greedy continuations from a prompt cut out of each of
them (:func:`~skipit.validators.compare.compare_generation`); both sides stop at the model's EOS.

Two layouts: a merged text decoder (``onnx/model.onnx``; text samples, prompt = first half of the tokens)
and the split graphs of a VLM export (``vision_encoder.onnx`` → ``embed_tokens.onnx`` →
``decoder_model_merged.onnx``, run by :class:`~skipit.runtime.ort_vlm.OrtVlmRunner`): up to ``samples``
image+text samples *and* up to ``samples`` text-only ones, encoded as the certificate encodes them, with
prompts cut as the parity check cuts them (never inside an image).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from skipit.compressor.placement import input_device as _input_device
from skipit.errors import ExportMismatchError, InvalidOptionError, SkipitError
from skipit.exporters.onnx.convention import MODEL_FILE, ONNX_SUBDIR, find_split_export
from skipit.runtime.base import host
from skipit.validators.compare import GenerationComparison, LogitComparison, compare_generation, compare_logits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendParityConfig:
    """How much to compare: ``samples`` text samples (split VLM graphs: ``samples`` image+text and ``samples``
    text-only ones), each cut to ``max_tokens`` (text); ``new_tokens`` greedy tokens; ``atol`` on the logits."""

    samples: int = 4
    max_tokens: int = 64
    new_tokens: int = 16
    atol: float = 1e-3
    device: str = "auto"


#: ``BackendParity.layout`` values
DECODER_LAYOUT, SPLIT_LAYOUT = "decoder", "split"


@dataclass
class BackendParity:
    """ONNX Runtime vs torch: ``layout`` is ``decoder`` (one merged graph) or ``split`` (VLM graphs);
    ``samples`` counts the compared samples per kind (``image+text``, ``text``)."""

    onnx_path: str
    logits: LogitComparison
    generation: GenerationComparison
    layout: str = DECODER_LAYOUT
    samples: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """What was compared, in words (the report's check notes)."""
        what = " and ".join(f"{n} {kind}" for kind, n in self.samples.items() if n) or "no"
        graphs = ("split graphs vision encoder → embeddings → decoder" if self.layout == SPLIT_LAYOUT
                  else "merged decoder graph")
        return f"{graphs}, {what} samples"

    def as_dict(self) -> dict[str, Any]:
        return {"onnx_path": self.onnx_path, "layout": self.layout, "samples": self.samples,
                "logits": self.logits.as_dict(), "generation": self.generation.as_dict()}


def find_onnx(path: str | Path) -> Path:
    """The decoder graph in ``path``: the file itself, ``onnx/model.onnx``, ``model.onnx`` or the only ``*.onnx``;
    for a split VLM export (:func:`~skipit.exporters.onnx.convention.find_split_export`), the folder of its graphs."""
    path = Path(path)
    if not path.exists():
        raise InvalidOptionError(f"--onnx {path} does not exist; give the export directory or its .onnx file")
    split = find_split_export(path)
    if split is not None:
        return split[1]
    if path.is_file():
        return path
    for candidate in (path / ONNX_SUBDIR / MODEL_FILE, path / MODEL_FILE, path / "decoder_model_merged.onnx"):
        if candidate.is_file():
            return candidate
    found = sorted(path.rglob("*.onnx"))
    if len(found) == 1:
        return found[0]
    what = ", ".join(str(p.relative_to(path)) for p in found[:5]) or "none"
    raise InvalidOptionError(f"cannot tell which graph in {path} is the decoder (found: {what}); pass the .onnx file itself")


def backend_parity(slim: Any, processor: Any, samples: Sequence[Any], onnx: str | Path,
                   config: BackendParityConfig = BackendParityConfig()) -> BackendParity:
    """Compare the ONNX export at ``onnx`` with the torch model ``slim`` on the first ``samples`` (see the module
    docstring for which samples each layout takes)."""
    path = find_onnx(onnx)
    if find_split_export(path) is not None:
        return _split_parity(slim, processor, samples, path, config)
    return _decoder_parity(slim, processor, samples, path, config)


def _eos(slim: Any, tokenizer: Any) -> Any:
    eos = slim.generation_config.eos_token_id if getattr(slim, "generation_config", None) else None
    return tokenizer.eos_token_id if eos is None else eos


def _onnx_run(path: Path, what: str, run: Any) -> Any:
    """``run()``; an onnxruntime failure is an export that cannot serve the input (exit code 6)."""
    try:
        return run()
    except SkipitError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ExportMismatchError(f"ONNX Runtime cannot run {path} on {what}: {exc}") from None


def _decoder_parity(slim: Any, processor: Any, samples: Sequence[Any], path: Path,
                    config: BackendParityConfig) -> BackendParity:
    """A merged text decoder graph on the first text-only samples."""
    import torch

    from skipit.runtime.ort import open_onnx
    from skipit.runtime.torch_runner import hf_greedy

    texts = [s for s in samples if s.image is None][: config.samples]
    if not texts:
        raise InvalidOptionError("ONNX parity compares the text decoder and needs text-only samples; the data has none")
    runner = open_onnx(path, config.device)
    tokenizer = getattr(processor, "tokenizer", processor)
    device = _input_device(slim)
    eos = _eos(slim, tokenizer)
    cand, ref, gen_ort, gen_torch = [], [], [], []
    for sample in texts:
        ids = tokenizer(sample.text, return_tensors="np", truncation=True, max_length=config.max_tokens)["input_ids"]
        ids = ids.astype(np.int64)
        logits, _ = _onnx_run(path, f"a {ids.shape} prompt", lambda ids=ids: runner.forward(ids))
        t_ids = torch.as_tensor(ids, device=device)
        with torch.inference_mode():
            expected = slim(input_ids=t_ids, use_cache=False).logits.float().cpu().numpy()
        cand.append(np.asarray(logits, dtype=np.float32).reshape(expected.shape[1:]))
        ref.append(expected[0])
        prompt = ids[:, : max(1, ids.shape[1] // 2)]
        gen_ort.append(runner.generate_greedy(prompt, config.new_tokens, eos_token_id=eos)[0, prompt.shape[1]:].tolist())
        gen_torch.append(hf_greedy(slim, {"input_ids": torch.as_tensor(prompt, device=device),
                                       "attention_mask": torch.ones(prompt.shape, dtype=torch.long, device=device)},
                                config.new_tokens, tokenizer.pad_token_id))
    return _result(path, cand, ref, gen_ort, gen_torch, config, DECODER_LAYOUT, {"text": len(texts)})


def _split_parity(slim: Any, processor: Any, samples: Sequence[Any], path: Path,
                  config: BackendParityConfig) -> BackendParity:
    """Split VLM graphs on image+text and text-only samples: the whole prompt teacher-forced, then greedy
    continuations from the parity check's prompts (vision encoder → embeddings → decoder with KV cache)."""
    import torch

    from skipit.compressor.arch import decoder_spec
    from skipit.compressor.batches import encode
    from skipit.runtime.ort import open_onnx
    from skipit.runtime.torch_runner import hf_greedy
    from skipit.validators.generation import build_prompts

    images = [s for s in samples if s.image is not None][: config.samples]
    texts = [s for s in samples if s.image is None][: config.samples]
    if not images and not texts:
        raise InvalidOptionError("ONNX parity needs samples; the evaluation data has none")
    chosen = images + texts
    runner = open_onnx(path, config.device)
    spec = decoder_spec(slim)
    tokenizer = getattr(processor, "tokenizer", processor)
    device = str(_input_device(slim))
    eos = _eos(slim, tokenizer)
    cand, ref = [], []
    for batch in encode(chosen, processor, spec, batch_size=1, max_length=config.max_tokens, device=device):
        sample = chosen[batch.sample_ids[0]]
        feed = {k: host(v) for k, v in batch.inputs.items()}
        what = f"sample {sample.origin or '?'} ({'image+text' if sample.image is not None else 'text'})"
        logits, _, _ = _onnx_run(path, what, lambda feed=feed: runner.prefill(feed["input_ids"], feed, feed["attention_mask"]))
        with torch.inference_mode():
            expected = slim(**batch.inputs, use_cache=False).logits.float().cpu().numpy()
        cand.append(np.asarray(logits, dtype=np.float32).reshape(expected.shape[1:]))
        ref.append(expected[0])
    gen_ort, gen_torch = [], []
    for prompt in build_prompts(chosen, processor, spec, max_prompt_tokens=config.max_tokens,
                                max_length=config.max_tokens, device=device):
        feed = {k: host(v) for k, v in prompt.inputs.items()}
        ids = feed["input_ids"]
        out = _onnx_run(path, f"the greedy prompt of sample {chosen[prompt.sample_id].origin or '?'}",
                        lambda ids=ids, feed=feed: runner.generate_greedy(
                            ids, feed, config.new_tokens, attention_mask=feed["attention_mask"], eos_token_id=eos,
                            pad_token_id=tokenizer.pad_token_id))
        gen_ort.append(out[0, ids.shape[1]:].tolist())
        gen_torch.append(hf_greedy(slim, prompt.inputs, config.new_tokens, tokenizer.pad_token_id))
    return _result(path, cand, ref, gen_ort, gen_torch, config, SPLIT_LAYOUT,
                   {"image+text": len(images), "text": len(texts)})


def _result(path: Path, cand: list[np.ndarray], ref: list[np.ndarray], gen_ort: list[list[int]],
            gen_torch: list[list[int]], config: BackendParityConfig, layout: str,
            samples: dict[str, int]) -> BackendParity:
    logit_cmp = compare_logits(np.concatenate(cand), np.concatenate(ref), atol=config.atol)
    parity = BackendParity(str(path), logit_cmp, compare_generation(gen_ort, gen_torch), layout, samples)
    log.info("ONNX parity (%s): max |Δlogit| %.3g, top-1 %.4f", parity.describe(), logit_cmp.max_abs,
             logit_cmp.top1_agreement)
    return parity

