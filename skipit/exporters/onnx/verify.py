"""Verifying an export: the graphs run by onnxruntime against the (unpatched, fp32) torch model.

Every export is checked unless ``verify=False``: a left-padded prefill batch and one cached decode step through
the decoder graph (text and VLM alike), and for VLMs the vision features on synthetic inputs of other image
counts and grids than the trace used, the embeddings, and — what a user's runtime sees — the checkpoint's own
processor on images of other sizes and aspect ratios than the trace's, one of them a prompt with two images
(``PROCESSOR_CHECKS``, per architecture also with other processor options, e.g. Idefics3's image splitting on
and off): the vision features and the prefill logits of the whole prompt through the three graphs. A mismatch
or an input a graph cannot serve raises :class:`~skipit.errors.ExportMismatchError` (exit code 6) naming it.
"""

from __future__ import annotations

import functools

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from skipit.compat import cache_kwarg
from skipit.errors import ExportMismatchError, ModelLoadError, SkipitError
from skipit.exporters.onnx.archs import OnnxConfig
from skipit.exporters.onnx.config import OnnxExportConfig
from skipit.exporters.onnx.model import KvGeometry, decoder_example

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

log = logging.getLogger(__name__)

# Image sets of the processor-driven verification, as (width, height) per image of one prompt: other sizes and
# aspect ratios than the trace's square example, and two images in one prompt. Small: processors resize anyway.
PROCESSOR_CHECKS: tuple[tuple[tuple[int, int], ...], ...] = (((61, 37),), ((40, 90),), ((52, 52), (90, 33)))
_CHECK_TEXT = "What is in the picture?"
#: (first input, attention mask, position ids, past or None) → (logits, present): one decoder-graph call.
DecoderCall = Callable[[Any, Any, Any, Any], tuple[Any, Any]]


@dataclass
class Errors:
    """Worst error per graph over the verification inputs, and which input it was."""

    config: OnnxExportConfig
    worst: dict[str, tuple[float, float, str]] = field(default_factory=dict)  # key → (error, tolerance, input)

    def add(self, key: str, got: "np.ndarray", ref: "np.ndarray", what: str) -> None:
        import numpy as np

        err = float(np.abs(got - ref).max()) if got.shape == ref.shape and np.isfinite(got).all() else float("inf")
        atol = self.config.tolerance(ref)
        if key not in self.worst or err / atol > self.worst[key][0] / self.worst[key][1]:
            self.worst[key] = (err, atol, what)

    def raise_on_mismatch(self) -> dict[str, float]:
        """Raise :class:`ExportMismatchError` for the first check beyond its tolerance; else the worst errors."""
        for key, (err, atol, what) in self.worst.items():
            log.info("ONNX %s vs torch: max abs error %.3g (tolerance %.3g; worst on %s)", key, err, atol, what)
            if not err <= atol:
                raise ExportMismatchError(
                    f"exported {key} differs from the torch model on {what}: max abs error {err:.3g} > {atol:.3g}. "
                    f"Try another exporter or dtype='fp32', or pass verify_atol= if the difference is expected")
        return {k: v[0] for k, v in self.worst.items()}


def served(what: str, run: Callable[[], Any]) -> Any:
    """``run()``; an onnxruntime failure becomes an :class:`ExportMismatchError` naming the input."""
    try:
        return run()
    except ExportMismatchError as exc:  # the runner refused an input shape: say which verification input it was
        raise ExportMismatchError(f"{exc} (verifying the export on {what})") from None
    except SkipitError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportMismatchError(
            f"the exported graphs cannot serve {what}: onnxruntime: {first}. This is a bug in skipit's export of "
            f"this architecture (something of the trace input was fixed in the graph); please report it") from None


def check_decoder(model: Any, geo: KvGeometry, call: DecoderCall, errors: Errors, *, embeds: bool,
                  mrope: bool = False) -> None:
    """A left-padded prefill [2, 6] with an empty past, then one cached decode step, through the decoder graph
    (``call``) and the torch model with transformers' own cache (sliding layers cropped); padding positions
    are not compared."""
    import numpy as np
    import torch
    from transformers import DynamicCache

    first, mask, positions, _ = decoder_example(geo, torch.float32, 2, 6, 0, embeds=embeds, mrope=mrope, left_pad=2,
                                                seed=1)
    first2 = decoder_example(geo, torch.float32, 2, 1, 0, embeds=embeds, mrope=mrope, seed=2)[0]
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    positions2 = positions[..., -1:] + 1
    key = "inputs_embeds" if embeds else "input_ids"
    with torch.no_grad():
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        kw = {cache_kwarg(model): cache, "use_cache": True}
        ref1 = model(**{key: first}, attention_mask=mask, position_ids=positions, **kw).logits.float().numpy()
        ref2 = model(**{key: first2}, attention_mask=mask2, position_ids=positions2, **kw).logits.float().numpy()
    what = "a left-padded prefill [2, 6] and one cached decode step"
    logits, present = served(what, lambda: call(first.numpy(), mask.numpy(), positions.numpy(), None))
    logits2, _ = served(what, lambda: call(first2.numpy(), mask2.numpy(), positions2.numpy(), present))
    real = mask.numpy()[:, :, None].astype(bool)  # padding positions are not compared
    errors.add("decoder graph", np.where(real, logits, 0), np.where(real, ref1, 0), what)
    errors.add("decoder graph", logits2, ref2, what)


def verify_text(model: Any, onnx_path: Path, geo: KvGeometry, config: OnnxExportConfig) -> dict[str, float]:
    """The merged decoder graph at ``onnx_path`` against the fp32 torch model (see :func:`check_decoder`)."""
    from skipit.runtime.ort_text import OrtDecoderRunner

    runner = OrtDecoderRunner(onnx_path)
    errors = Errors(config)
    check_decoder(model, geo, lambda ids, mask, pos, past: runner.forward(ids, mask, past, position_ids=pos),
                  errors, embeds=False)
    return errors.raise_on_mismatch()


def verify_vlm(model: Any, model_dir: Path, arch: str, record: OnnxConfig, geo: KvGeometry, onnx_dir: Path,
               config: OnnxExportConfig) -> dict[str, float]:
    """Compare the split graphs with the (unpatched, fp32) torch model; raise ExportMismatchError on a mismatch or
    on an input they cannot serve. Returns the worst error per check."""
    import torch

    from skipit.runtime.ort_vlm import OrtVlmRunner

    runner = OrtVlmRunner(onnx_dir.parent, onnx_dir=onnx_dir)
    errors = Errors(config)
    _, synthetic = record.vision_examples(model)
    for i, inputs in enumerate(synthetic):
        _check_vision(model, record, runner, inputs, errors, f"synthetic vision input {i + 1}")
    ids = decoder_example(geo, torch.float32, 2, 6, 0, seed=1)[0]
    with torch.no_grad():
        ref_embeds = model.get_input_embeddings()(ids).numpy()
    errors.add("embed graph", runner.embed(ids.numpy()), ref_embeds, "random token ids [2, 6]")
    check_decoder(model, geo, lambda embeds, mask, pos, past: runner.decode_step(embeds, mask, pos, past), errors,
                  embeds=True, mrope=record.mrope)
    for what, inputs in _processor_inputs(model_dir, arch, record):
        _check_vision(model, record, runner, inputs, errors, what)
        with torch.no_grad():
            ref = model(**inputs).logits.float().numpy()
        ids_np, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
        got = served(f"{what} ({_shapes(inputs, ('input_ids', *record.vision_inputs))})",
                     functools.partial(runner.prefill, ids_np, inputs, mask))[0]
        errors.add("image+text prefill", got, ref, what)
    return errors.raise_on_mismatch()


def _shapes(inputs: Mapping[str, Any], names: Sequence[str]) -> str:
    return ", ".join(f"{n} {list(inputs[n].shape)}" for n in names if n in inputs)


def _reference_features(model: Any, inputs: Mapping[str, "torch.Tensor"]) -> "np.ndarray":
    """The unpatched model's image features for the vision inputs, as the rows the graph returns."""
    import torch

    with torch.no_grad():
        ref = model.model.get_image_features(**inputs, return_dict=True).pooler_output
    ref = torch.cat(list(ref)) if isinstance(ref, (list, tuple)) else ref
    return ref.reshape(-1, ref.shape[-1]).float().numpy()


def _check_vision(model: Any, record: OnnxConfig, runner: Any, inputs: Mapping[str, "torch.Tensor"], errors: Errors,
                  what: str) -> None:
    vision = {n: inputs[n] for n in record.vision_inputs if n in inputs}
    got = served(f"{what} ({_shapes(vision, list(record.vision_inputs))})",
                 lambda: runner.image_features({k: v.numpy() for k, v in vision.items()}))
    errors.add("vision graph", got, _reference_features(model, vision), what)


def _processor_inputs(model_dir: Path, arch: str, record: OnnxConfig) -> list[tuple[str, dict[str, "torch.Tensor"]]]:
    """(description, processor output) for every image set of ``PROCESSOR_CHECKS`` × ``record.processor_options``;
    empty (with a warning) when the checkpoint has no processor."""
    import numpy as np
    from PIL import Image

    from skipit.compressor.arch import REGISTRY
    from skipit.compressor.loading import LoadOptions, load_processor

    try:
        processor, _ = load_processor(model_dir, True, LoadOptions())
    except ModelLoadError as exc:
        processor, reason = None, str(exc)
    else:
        reason = "it has a tokenizer but no image processor"
    if processor is None or not hasattr(processor, "image_processor"):
        log.warning("%s: %s; the export is verified on synthetic pixel inputs only", model_dir, reason)
        return []
    slot = REGISTRY[arch].image_prompt.format(text="")
    rng = np.random.default_rng(0)
    cases = []
    for sizes in PROCESSOR_CHECKS:
        images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
        for options in record.processor_options:
            what = (f"a {sizes[0][0]}×{sizes[0][1]} image" if len(sizes) == 1 else
                    f"{len(sizes)} images ({', '.join(f'{w}×{h}' for w, h in sizes)}) in one prompt")
            what += "".join(f", {k}={v}" for k, v in options.items())
            inputs = processor(text=[slot * len(images) + _CHECK_TEXT], images=[images], return_tensors="pt", **options)
            cases.append((what, dict(inputs)))
    return cases
