"""Is the slim model the original's? Before parity is measured, the gate checks that the slim folder predicts
over the same vocabulary (its model, and its ONNX export's graphs or config) and that its own tokenizer encodes
the evaluation data exactly as the original's does; a mismatch is an exit-2/6 error naming the difference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from skipit.compressor.loading import LoadedModel
from skipit.errors import ExportError, ExportMismatchError, InvalidOptionError, ModelLoadError, TokenizerMismatchError
from skipit.validators.parity import ParityConfig


def vocab_size(model: Any) -> int:
    """How many tokens ``model`` predicts over: the rows of its output embedding (``config.vocab_size`` else)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(model.config.get_text_config().vocab_size)


def check_same_vocabulary(original: LoadedModel, slim: LoadedModel) -> None:
    """Raise :class:`ModelLoadError` if the two models predict over vocabularies of different sizes."""
    a, b = vocab_size(original.model), vocab_size(slim.model)
    if a != b:
        raise ModelLoadError(f"the slim model {slim.source} predicts over {b} tokens but the original {original.source} "
                             f"over {a}: it was not made from this original; validate it against the model it was "
                             "compressed from")


def _token_differences(a: dict[str, int], b: dict[str, int]) -> list[str]:
    return [f"{tok!r}: {a.get(tok)} vs {b.get(tok)}" for tok in sorted(set(a) | set(b), key=lambda t: (a.get(t, -1), t))
            if a.get(tok) != b.get(tok)]


def _difference(x: Any, y: Any) -> str | None:
    """None when two encoded model inputs are identical, else where they first differ, in words."""
    import torch

    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        if x.shape != y.shape:
            return f"shape {list(x.shape)} vs {list(y.shape)}"
        if torch.equal(x, y):
            return None
        index = (x != y).nonzero()[0].tolist()
        return f"at {index}: {x[tuple(index)].item()} vs {y[tuple(index)].item()}"
    if x is None or y is None:
        return f"given by the {'original' if y is None else 'slim'} processor only"
    return None if repr(x) == repr(y) else f"{repr(x)[:60]} vs {repr(y)[:60]}"


def check_same_encoding(original: LoadedModel, slim: LoadedModel, samples: list[Any], parity: ParityConfig) -> None:
    """Raise :class:`TokenizerMismatchError` unless the slim folder's tokenizer/processor maps every token to
    the original's id and encodes every sample (text, and images for VLMs) to identical model inputs.

    After this check the two processors are interchangeable on ``samples``, so parity may encode once.
    """
    from skipit.compressor.arch import decoder_spec
    from skipit.compressor.batches import encode

    fix = (f"the slim folder's tokenizer files were changed or come from another model; copy the original's tokenizer "
           f"and processor files into {slim.model_dir}")
    diff = _token_differences(original.tokenizer.get_vocab(), slim.tokenizer.get_vocab())
    if diff:
        raise TokenizerMismatchError(f"the slim model's tokenizer in {slim.model_dir} maps {len(diff)} tokens to other "
                                     f"ids than the original's (token: original vs slim — {'; '.join(diff[:3])}); {fix}")
    spec = decoder_spec(original.model)
    kw: dict[str, Any] = {"batch_size": parity.batch_size, "max_length": parity.max_length}
    for ours, theirs in zip(encode(samples, original.processor, spec, **kw), encode(samples, slim.processor, spec, **kw)):
        for key in sorted(set(ours.inputs) | set(theirs.inputs)):
            what = _difference(ours.inputs.get(key), theirs.inputs.get(key))
            if what is not None:
                origin = samples[ours.sample_ids[0]].origin
                raise TokenizerMismatchError(f"the slim model's tokenizer/processor in {slim.model_dir} encodes the "
                                             f"evaluation data differently from the original's ({key} of the batch "
                                             f"from {origin} on, {what}); {fix}")


def _graph_vocab_sizes(path: Path) -> dict[str, int]:
    """``{graph file: vocabulary}`` read from the static last dimension of each graph's ``logits`` output."""
    import onnx

    found = {}
    for graph in [path] if path.is_file() else sorted(path.rglob("*.onnx")):
        try:
            proto = onnx.load(str(graph), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, which is no OSError/ValueError
            raise ExportError(f"{graph} is not a readable ONNX graph ({type(exc).__name__}: {exc}); "
                              "export it again with `skipit export`") from None
        for output in proto.graph.output:
            dims = output.type.tensor_type.shape.dim
            if output.name == "logits" and dims and dims[-1].HasField("dim_value"):
                found[str(graph)] = int(dims[-1].dim_value)
    return found


def _config_vocab_size(path: Path) -> dict[str, int]:
    """``{config.json: vocab_size}`` for the export folder's config (beside the graphs or one level up)."""
    folder = path.parent if path.is_file() else path
    for candidate in (folder / "config.json", folder.parent / "config.json"):
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text())
                text = config.get("text_config") or config
                return {str(candidate): int(text["vocab_size"])}
            except (ValueError, KeyError, TypeError, AttributeError):
                return {}
    return {}


def check_onnx_vocabulary(onnx: Path, slim: LoadedModel) -> None:
    """Raise :class:`ExportMismatchError` if the ONNX export at ``onnx`` predicts over another vocabulary than
    ``slim`` (read from its graphs' ``logits`` outputs, else its ``config.json``); nothing to read: no check."""
    if not onnx.exists():
        raise InvalidOptionError(f"--onnx {onnx} does not exist; give the export directory or its .onnx file")
    try:
        declared = _graph_vocab_sizes(onnx)
    except ImportError:
        declared = {}
    declared = declared or _config_vocab_size(onnx)
    want = vocab_size(slim.model)
    wrong = {where: n for where, n in declared.items() if n != want}
    if wrong:
        where, n = next(iter(wrong.items()))
        raise ExportMismatchError(f"the ONNX export {where} predicts over {n} tokens but the slim model {slim.source} "
                                  f"over {want}: it was exported from another model; export the slim model again "
                                  "(`skipit export`) and validate that")
