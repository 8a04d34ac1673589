"""ONNX export of a text decoder checkpoint (one merged prefill + decode graph with KV cache) and an
onnxruntime runner for it.

What gets written
-----------------
``export_text_decoder(model_dir, out_dir)`` writes a directory that loads unchanged in optimum's
``ORTModelForCausalLM.from_pretrained(out_dir)`` and in transformers.js (``onnx/model.onnx`` is its
default file name)::

    out_dir/
        config.json, generation_config.json        copied from model_dir
        tokenizer.json, tokenizer_config.json, …    copied when present (see _TOKENIZER_FILES)
        onnx/model.onnx                             the graph
        onnx/model.onnx_data                        the weights, only when large (external data)
        genai_config.json                           for onnxruntime-genai (og.Model(out_dir)), see skipit.exporters.genai

In skipit's pipeline this is ``export_text_decoder(slim_dir, OUT / "onnx")``: ``OUT/onnx`` is then a
self-contained ONNX model folder.

The graph (optimum's ``text-generation-with-past`` convention)
-------------------------------------------------------------
Inputs: ``input_ids`` [batch_size, sequence_length] int64, ``attention_mask`` [batch_size,
total_sequence_length] int64 (total = past + sequence, 1 = attend, 0 = padding), ``position_ids``
[batch_size, sequence_length] int64, and for every decoder layer ``i`` of the (slim) config
``past_key_values.{i}.key`` / ``.value`` [batch_size, kv_heads, past_sequence_length, head_dim].
Outputs: ``logits`` [batch_size, sequence_length, vocab] and ``present.{i}.key`` / ``.value``
[batch_size, kv_heads, past_sequence_length + sequence_length, head_dim] (the past with the new
tokens appended: feed them back as the next step's past).

Prefill passes a past of length 0; onnxruntime accepts zero-length tensors (measured). TensorRT does
not: see :func:`skipit.exporters.tensorrt.with_dummy_past` for the masked one-slot workaround, which
this graph supports because positions come from ``position_ids`` and masking from ``attention_mask``.

How it is traced
----------------
A wrapper module with an explicit signature builds a transformers ``DynamicCache`` from the flat
past tensors, calls the model with ``cache=`` (transformers ≥ 5.24; ``past_key_values=`` on older
5.x releases, detected from the forward signature) and flattens the returned cache. Every layer gets
a plain full-length cache layer, *also* the sliding-window ones: the sliding window is applied by the
attention mask, which transformers builds from absolute positions, so the graph is exact for any
length (sliding layers just keep their whole past, as in optimum's exports). The model is loaded with
``attn_implementation="eager"``: at opset 18 attention is MatMul/Softmax either way, and eager's
finite mask value keeps fully padded rows free of NaN (SDPA's -inf does not) and keeps Gemma-2's
logit soft-capping.

``torch.onnx.export(dynamo=True)`` is the default route; ``exporter="legacy"`` uses the TorchScript
exporter, ``"auto"`` tries dynamo and falls back to legacy. Both give the same results (max abs logits
error vs torch ~1e-7 on toy models, ~1e-4 on SmolLM2-135M at logit scale 31). Measured on two shared
CPU cores: toy 6-layer models 20–50 s dynamo vs 2–8 s legacy; SmolLM2-135M (30 layers) 184 s dynamo
vs 67 s legacy, verification included. Legacy stores a tied embedding twice (the constant-folded,
transposed LM head: +113 MB on SmolLM2); dynamo stores it once. Every export is verified against
the torch model with onnxruntime (a left-padded prefill batch, then one cached decode step) unless
``verify=False``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from skipit.errors import ExportError, ExportMismatchError, InvalidOptionError, ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

log = logging.getLogger(__name__)

ONNX_SUBDIR = "onnx"
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx_data"

# Dimension names of the graph's inputs. skipit.exporters.tensorrt recognises these (and optimum's).
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
PRESENT_LEN = f"{PAST} + {SEQ}"  # what the dynamo exporter derives for present.*; legacy is told the same

# Files copied next to onnx/ when model_dir has them (tokenizer files of every common kind).
_CONFIG_FILES = ("config.json", "generation_config.json")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
# Layer types whose KV cache is a plain [batch, kv_heads, past, head_dim] pair per layer.
_KV_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
_EXPORTERS = ("dynamo", "legacy", "auto")
BACKENDS = ("torch", "optimum")
_DTYPES = ("fp32", "fp16")
# Weights above this size go to model.onnx_data (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30
# Example sizes used for tracing: distinct and > 1 so no dimension is specialised to 0/1 or unified.
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 4


@dataclass(frozen=True)
class OnnxExportConfig:
    """How to export. Frozen; validates itself.

    Attributes:
        opset: default-domain ONNX opset (18 keeps attention as MatMul/Softmax, which TensorRT parses).
        dtype: ``"fp32"`` or ``"fp16"`` (weights, activations and KV cache in half precision).
        exporter: ``"dynamo"`` (torch.export based, default), ``"legacy"`` (TorchScript) or ``"auto"``
            (dynamo, falling back to legacy when dynamo fails).
        backend: ``"torch"`` (skipit's own export through ``torch.onnx``, default) or ``"optimum"``
            (optimum's exporter, text decoders only, where optimum-onnx is installed: transformers
            < 4.58; see :mod:`skipit.exporters.onnx_optimum`). Both are verified the same way.
        external_data: write weights to ``model.onnx_data``; ``None`` decides by size (> 1 GiB).
        verify: run the graph with onnxruntime after export and compare with torch; raise on mismatch.
        verify_atol: allowed max abs logits error; ``None``: 1e-3 for fp32, 2e-2 × max(1, |logits|) for fp16.
        overwrite: replace the files this export writes when ``out_dir`` already holds an export.
    """

    opset: int = 18
    dtype: str = "fp32"
    exporter: str = "dynamo"
    backend: str = "torch"
    external_data: bool | None = None
    verify: bool = True
    verify_atol: float | None = None
    overwrite: bool = False
    attn_implementation: str = field(default="eager", repr=False)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise InvalidOptionError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise InvalidOptionError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "optimum" and self.dtype != "fp32":
            raise InvalidOptionError("--backend optimum exports fp32 on the CPU (optimum's fp16 export needs CUDA); "
                                     "use --backend torch for --dtype fp16")
        if self.exporter not in _EXPORTERS:
            raise InvalidOptionError(f"exporter must be one of {', '.join(_EXPORTERS)}, got {self.exporter!r}")
        if not 14 <= self.opset <= 23:
            raise InvalidOptionError(
                f"opset must be between 14 and 23, got {self.opset}; 18 is the tested default (TensorRT-friendly)"
            )
        if self.verify_atol is not None and not self.verify_atol > 0:
            raise InvalidOptionError(f"verify_atol must be > 0, got {self.verify_atol}")


def kv_input_names(num_layers: int) -> list[str]:
    """``past_key_values.{i}.key/value`` for every layer, in graph order."""
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def kv_output_names(num_layers: int) -> list[str]:
    """``present.{i}.key/value`` for every layer, in graph order."""
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


# --------------------------------------------------------------------------------------------------
# Model and cache plumbing
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KvGeometry:
    """Shape of a decoder's KV cache: one ``[batch, kv_heads, length, head_dim]`` pair per layer."""

    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int


def kv_geometry(model: Any) -> KvGeometry:
    """KV-cache shape from the text config; refuse layer types without a plain KV pair."""
    cfg = model.config.get_text_config(decoder=True)
    n = int(cfg.num_hidden_layers)
    layer_types = list(getattr(cfg, "layer_types", None) or [])
    if layer_types and len(layer_types) != n:
        raise ExportError(
            f"config has num_hidden_layers={n} but {len(layer_types)} layer_types; the checkpoint's per-layer "
            f"config was not sliced when layers were removed: rebuild it with skipit's rewrite"
        )
    odd = sorted(set(layer_types) - _KV_LAYER_TYPES)
    if odd:
        raise ExportError(
            f"layer types {odd} have no plain per-layer KV cache; the ONNX text exporter supports "
            f"{sorted(_KV_LAYER_TYPES)} only"
        )
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return KvGeometry(n, kv_heads, head_dim, int(cfg.vocab_size))


def cache_kwarg(model: Any) -> str:
    """``cache`` on transformers ≥ 5.24, ``past_key_values`` on earlier releases."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _build_cache(past: Sequence[tuple["torch.Tensor", "torch.Tensor"]]) -> Any:
    """A DynamicCache holding ``past`` with one full-length layer per decoder layer.

    Full-length layers also for sliding-window layers: the mask (built from absolute positions)
    applies the window, so keeping the whole past is exact. ``get_seq_length`` reads the shape
    directly, without DynamicLayer's ``numel() == 0`` test, which would put a guard on the past
    length into the traced graph.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class _TracedLayer(DynamicLayer):
        def __init__(self, keys: "torch.Tensor", values: "torch.Tensor") -> None:
            super().__init__()
            self.keys, self.values = keys, values
            self.device = keys.device
            self.is_initialized = True

        def get_seq_length(self) -> int:
            return self.keys.shape[-2]

    cache = DynamicCache()
    cache.layers = [_TracedLayer(k, v) for k, v in past]
    cache.layer_class_to_replicate = None  # a layer index beyond the past is a bug, not a new layer
    return cache


def forward_with_past(model: Any, cache_kwarg: str, past_key_values: Sequence[tuple[Any, Any]], **inputs: Any) -> tuple:
    """Run ``model`` on a cache built from flat past tensors; return ``(logits, *present)``.

    The body of every traced decoder wrapper (text and VLM): the cache is updated in place, so each
    layer holds past + the new tokens afterwards, flattened as key, value per layer.
    """
    cache = _build_cache(past_key_values)
    out = model(**inputs, use_cache=True, **{cache_kwarg: cache})
    present: list[Any] = []
    for layer in cache.layers:
        present += [layer.keys, layer.values]
    return (out.logits, *present)


def _make_wrapper(model: Any, num_layers: int) -> "torch.nn.Module":
    """nn.Module with the graph's explicit signature around a CausalLM."""
    import torch

    kwarg = cache_kwarg(model)

    class DecoderWithPast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            position_ids: torch.Tensor,
            past_key_values: list[tuple[torch.Tensor, torch.Tensor]],
        ) -> tuple[torch.Tensor, ...]:
            return forward_with_past(self.model, kwarg, past_key_values, input_ids=input_ids,
                                     attention_mask=attention_mask, position_ids=position_ids)

    return DecoderWithPast().eval()


def load_text_decoder(model_dir: Path, config: OnnxExportConfig) -> Any:
    """The fp32 causal LM in ``model_dir``, loaded for export (``config.attn_implementation``); clear
    errors for multimodal or unloadable checkpoints."""
    import torch
    from transformers import AutoModelForCausalLM

    from skipit.compat import load_overrides

    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} has no config.json: pass a Hugging Face checkpoint directory")
    raw = json.loads((model_dir / "config.json").read_text())
    if "vision_config" in raw or "audio_config" in raw:
        raise ExportError(
            f"{model_dir} is a multimodal checkpoint ({', '.join(raw.get('architectures') or ['?'])}); "
            f"export_text_decoder exports text decoders only. VLMs need split graphs (vision encoder, "
            f"token embeddings, decoder taking inputs_embeds)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=config.attn_implementation, **load_overrides(model_dir)
        )
    except (ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(
            f"cannot load {model_dir} as a causal LM for ONNX export: {exc}. The text exporter takes text "
            f"decoders (LlamaForCausalLM, Qwen2ForCausalLM, …); VLMs need split graphs"
        ) from exc
    return model.eval()


def _example_inputs(geo: KvGeometry, dtype: "torch.dtype", batch: int, seq: int, past: int,
                    left_pad: int = 0, seed: int = 0) -> tuple:
    """(input_ids, attention_mask, position_ids, past) with row 0 left-padded by ``left_pad``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, geo.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    mask[0, :left_pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    kv = [
        (
            torch.randn(batch, geo.kv_heads, past, geo.head_dim, generator=gen).to(dtype),
            torch.randn(batch, geo.kv_heads, past, geo.head_dim, generator=gen).to(dtype),
        )
        for _ in range(geo.num_layers)
    ]
    return ids, mask, positions, kv


# --------------------------------------------------------------------------------------------------
# The two export routes; each returns an onnx_ir.Model with the final input/output names
# --------------------------------------------------------------------------------------------------
def _export_dynamo(wrapper: Any, args: tuple, geo: KvGeometry, config: OnnxExportConfig) -> Any:
    import torch

    dim = torch.export.Dim
    batch, seq, past, total = dim(BATCH), dim(SEQ), dim(PAST), dim(TOTAL)
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past_key_values": [({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(geo.num_layers)],
    }
    with warnings_to_debug():
        program = _dynamo_export(wrapper, args, geo, config, dynamic_shapes)
    return program.model


def _dynamo_export(wrapper: Any, args: tuple, geo: KvGeometry, config: OnnxExportConfig,
                   dynamic_shapes: dict[str, Any]) -> Any:
    import torch

    return torch.onnx.export(
        wrapper,
        args,
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        input_names=["input_ids", "attention_mask", "position_ids", *kv_input_names(geo.num_layers)],
        output_names=["logits", *kv_output_names(geo.num_layers)],
        opset_version=config.opset,
        optimize=True,
        verbose=False,
        custom_translation_table=dynamo_translations(),
    )


def _export_legacy(wrapper: Any, args: tuple, geo: KvGeometry, config: OnnxExportConfig, tmp: Path) -> Any:
    import onnx_ir as ir

    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: BATCH, 1: SEQ},
        "attention_mask": {0: BATCH, 1: TOTAL},
        "position_ids": {0: BATCH, 1: SEQ},
        "logits": {0: BATCH, 1: SEQ},
    }
    axes.update({n: {0: BATCH, 2: PAST} for n in kv_input_names(geo.num_layers)})
    axes.update({n: {0: BATCH, 2: PRESENT_LEN} for n in kv_output_names(geo.num_layers)})
    path = tmp / "legacy.onnx"
    # The tracer warns about Python branches on shapes in transformers' mask code: the branches taken
    # for the example (no mask padding needed, no cache-free shortcut) are the right ones for every
    # input that follows the convention, and verify_against_torch runs the graph on other shapes.
    with warnings_to_debug():
        _legacy_export(wrapper, args, path, geo, config, axes)
    return ir.load(path)


def _legacy_export(wrapper: Any, args: tuple, path: Path, geo: KvGeometry, config: OnnxExportConfig,
                   axes: dict[str, dict[int, str]]) -> None:
    import torch

    from skipit.compat import torchscript_patches

    with torchscript_patches():
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            dynamo=False,
            input_names=["input_ids", "attention_mask", "position_ids", *kv_input_names(geo.num_layers)],
            output_names=["logits", *kv_output_names(geo.num_layers)],
            dynamic_axes=axes,
            opset_version=config.opset,
            do_constant_folding=True,
        )


def dynamo_translations() -> dict[Any, Any]:
    """Custom ATen → ONNX translations for ``torch.onnx.export(dynamo=True, custom_translation_table=…)``.

    ``aten.arange.start_step`` with constant, non-integral arguments becomes the constant torch computes.
    torch sizes a float ``arange`` in double precision, the ONNX ``Range`` that torchlib emits in float32,
    so the two can differ by one element while ops traced after it keep torch's length: Idefics3's
    ``torch.arange(1/6, 1.0, 1/6)`` (position buckets of a 6×6 patch grid) has 6 elements in torch and 5
    in ONNX, and its ``bucketize`` then gathers out of range (onnxruntime: "GatherND … invalid index
    found, index = 5"). Dynamic or all-integer arguments keep torchlib's translation.
    """
    import onnx_ir as ir
    import torch

    try:
        from onnxscript import opset18 as op
        from onnxscript.function_libs.torch_lib.ops.core import aten_arange_start_step
    except ImportError as exc:  # pragma: no cover - another onnxscript layout: torchlib's own translation
        log.debug("constant-arange translation unavailable (%s); float aranges may be sized in float32", exc)
        return {}

    # ONNX dtype codes (absent: torch's default float dtype) → torch dtype
    float_dtypes = {-1: None, None: None, ir.DataType.FLOAT: torch.float32, ir.DataType.DOUBLE: torch.float64}

    def arange_start_step(start: Any, end: Any, step: Any = 1, dtype: int = -1, layout: str = "",
                          device: str = "", pin_memory: bool = False) -> Any:
        args = (start, end, step)
        constant = all(isinstance(x, (int, float)) for x in args) and not all(isinstance(x, int) for x in args)
        if not constant or dtype not in float_dtypes:
            return aten_arange_start_step(start, end, step, dtype, layout, device, pin_memory)
        return op.Constant(value=ir.tensor(torch.arange(start, end, step, dtype=float_dtypes[dtype]).numpy()))

    return {torch.ops.aten.arange.start_step: arange_start_step}


@contextlib.contextmanager
def warnings_to_debug() -> Iterator[None]:
    """Exporter chatter (tracer warnings, axis-renaming notes, deprecations) goes to the debug log."""
    # torch.onnx logs "torchvision is not installed. Skipping torchvision::nms" and the like at WARNING
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        quiet.setLevel(level)
    for w in caught:
        log.debug("exporter warning: %s: %s", w.category.__name__, str(w.message).splitlines()[0])


def check_graph_io(model_ir: Any, geo: KvGeometry) -> None:
    """The graph has exactly the inputs and outputs the convention promises."""
    want_in = ["input_ids", "attention_mask", "position_ids", *kv_input_names(geo.num_layers)]
    want_out = ["logits", *kv_output_names(geo.num_layers)]
    got_in = [v.name for v in model_ir.graph.inputs]
    got_out = [v.name for v in model_ir.graph.outputs]
    if got_in != want_in or got_out != want_out:
        raise ExportError(
            f"exported graph has inputs {got_in[:5]}… ({len(got_in)}) and outputs {got_out[:3]}… ({len(got_out)}); "
            f"expected {len(want_in)} inputs and {len(want_out)} outputs named after the config's "
            f"{geo.num_layers} layers. This is a bug in skipit's exporter: please report it"
        )


def strip_debug_metadata(model_ir: Any) -> None:
    """Drop the dynamo exporter's per-node debug records (FX node, Python stack trace with local file
    paths, module names): for a toy model they are 40% of the file, and they leak the build machine's
    paths into a shipped artifact."""
    import onnx_ir as ir

    for node in ir.traversal.RecursiveGraphIterator(model_ir.graph):
        node.metadata_props.clear()


def initializer_bytes(model_ir: Any) -> int:
    return sum(int(v.const_value.nbytes) for v in model_ir.graph.initializers.values() if v.const_value is not None)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def export_text_decoder(
    model_dir: str | os.PathLike, out_dir: str | os.PathLike, config: OnnxExportConfig = OnnxExportConfig()
) -> Path:
    """Export a Hugging Face text decoder checkpoint to ``out_dir/onnx/model.onnx`` with KV cache.

    Also copies ``config.json``, ``generation_config.json`` and the tokenizer files (those present) into
    ``out_dir``, so that ``out_dir`` loads unchanged in optimum and transformers.js. The number of KV
    inputs follows the checkpoint's ``num_hidden_layers`` (a slim checkpoint gets fewer). Files are
    built in a temporary folder beside ``out_dir`` and moved into place at the end.

    Args:
        model_dir: checkpoint directory (``config.json`` + safetensors), e.g. skipit's slim ``model/``.
        out_dir: where to write; must not hold an export already unless ``config.overwrite``.
        config: export options.

    Returns:
        Path of the written ``model.onnx``.

    Raises:
        ModelLoadError: ``model_dir`` is not a loadable causal LM.
        OutputExistsError: ``out_dir`` already holds an export and ``overwrite`` is False.
        ExportError: tracing failed, or the graph does not match torch within tolerance.
    """
    import torch

    from skipit.errors import OutputExistsError
    from skipit.exporters.genai import write_genai_config

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    target = out_dir / ONNX_SUBDIR / MODEL_FILE
    if target.exists() and not config.overwrite:
        raise OutputExistsError(f"{target} exists; choose another out_dir or pass overwrite=True (--overwrite)")

    started = time.perf_counter()
    model = load_text_decoder(model_dir, config)
    geo = kv_geometry(model)
    reference = model
    if config.dtype == "fp16":
        import copy

        model = copy.deepcopy(model).to(torch.float16)
    dtype = torch.float16 if config.dtype == "fp16" else torch.float32
    log.info("exporting %s (%d layers, %d KV heads × %d) to ONNX opset %d, %s, %s",
             model_dir, geo.num_layers, geo.kv_heads, geo.head_dim, config.opset, config.dtype,
             "optimum" if config.backend == "optimum" else f"exporter={config.exporter}")

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".skipit-onnx-", dir=out_dir) as tmp_name:
        tmp = Path(tmp_name)
        if config.backend == "optimum":
            from skipit.exporters.onnx_optimum import export_with_optimum

            with warnings_to_debug():
                model_ir, route = export_with_optimum(model_dir, tmp, config.opset), "optimum"
        else:
            wrapper = _make_wrapper(model, geo.num_layers)
            args = _example_inputs(geo, dtype, EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST)
            model_ir, route = _trace(wrapper, args, geo, config, tmp)
        check_graph_io(model_ir, geo)
        strip_debug_metadata(model_ir)
        model_ir.metadata_props.update({
            "skipit.exporter": route,
            "skipit.num_hidden_layers": str(geo.num_layers),
            "skipit.dtype": config.dtype,
        })
        external = config.external_data
        if external is None:
            external = initializer_bytes(model_ir) > EXTERNAL_DATA_THRESHOLD
        staged = tmp / "staged"
        (staged / ONNX_SUBDIR).mkdir(parents=True)
        _save(model_ir, staged / ONNX_SUBDIR / MODEL_FILE, external)
        del model_ir
        copy_side_files(model_dir, staged)
        write_genai_config(staged, f"{ONNX_SUBDIR}/{MODEL_FILE}", strict=False)  # onnxruntime-genai loads out_dir as is
        if config.verify:
            verify_against_torch(reference, staged / ONNX_SUBDIR / MODEL_FILE, geo, config)
        move_into_place(staged, out_dir)

    log.info("ONNX export of %s done in %.1f s (%s exporter): %s", model_dir.name,
             time.perf_counter() - started, route, target)
    return target


def _trace(wrapper: Any, args: tuple, geo: KvGeometry, config: OnnxExportConfig, tmp: Path) -> tuple[Any, str]:
    """Run the chosen exporter (with auto's fallback); return (onnx_ir model, route used)."""
    import torch

    routes = ["dynamo", "legacy"] if config.exporter == "auto" else [config.exporter]
    errors: list[str] = []
    for route in routes:
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                if route == "dynamo":
                    model_ir = _export_dynamo(wrapper, args, geo, config)
                else:
                    model_ir = _export_legacy(wrapper, args, geo, config, tmp)
        except Exception as exc:  # noqa: BLE001 - any tracer failure is reported, or falls back
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            errors.append(f"{route}: {type(exc).__name__}: {first}")
            if route != routes[-1]:
                log.warning("dynamo ONNX export failed (%s); falling back to the legacy exporter", first)
                continue
            raise ExportError(
                "ONNX export failed: " + "; ".join(errors)
                + ". Try OnnxExportConfig(exporter='auto') (CLI: --exporter auto) or another opset"
            ) from exc
        log.info("%s exporter traced the graph in %.1f s", route, time.perf_counter() - t0)
        return model_ir, route
    raise AssertionError("unreachable")  # pragma: no cover


def _save(model_ir: Any, path: Path, external: bool) -> None:
    import onnx_ir as ir

    if external:
        ir.save(model_ir, path, external_data=EXTERNAL_DATA_FILE)
    else:
        ir.save(model_ir, path)


def copy_side_files(model_dir: Path, dest: Path) -> None:
    """config.json, generation_config.json and tokenizer files, for optimum / transformers.js.

    transformers 5.x writes ``"tokenizer_class": "TokenizersBackend"``, which transformers 4.x (optimum's
    environment) refuses; with a ``tokenizer.json`` present the copy says ``PreTrainedTokenizerFast``,
    which every client loads.
    """
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} has no config.json")
    copied = []
    for name in (*_CONFIG_FILES, *_TOKENIZER_FILES):
        src = model_dir / name
        if src.is_file():
            shutil.copy2(src, dest / name)
            copied.append(name)
    tok_cfg = dest / "tokenizer_config.json"
    if tok_cfg.is_file() and (dest / "tokenizer.json").is_file():
        data = json.loads(tok_cfg.read_text())
        if data.get("tokenizer_class") == "TokenizersBackend":
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
            data.setdefault("model_input_names", ["input_ids", "attention_mask"])  # 4.x would add token_type_ids
            tok_cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    if not any(n in copied for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")):
        log.warning("%s has no tokenizer files; the ONNX folder will need a tokenizer from elsewhere", model_dir)


def move_into_place(staged: Path, out_dir: Path) -> None:
    """Move every staged file to the same place under out_dir (os.replace: atomic per file)."""
    onnx_dir = out_dir / ONNX_SUBDIR
    onnx_dir.mkdir(parents=True, exist_ok=True)
    stale = onnx_dir / EXTERNAL_DATA_FILE  # an earlier, larger export's weights must not linger
    if stale.exists() and not (staged / ONNX_SUBDIR / EXTERNAL_DATA_FILE).exists():
        stale.unlink()
    # weights first, graph last: a reader never sees a new graph next to old weights
    files = sorted((p for p in staged.rglob("*") if p.is_file()), key=lambda p: p.name == MODEL_FILE)
    for src in files:
        dst = out_dir / src.relative_to(staged)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------
def verify_against_torch(reference: Any, onnx_path: Path, geo: KvGeometry, config: OnnxExportConfig) -> None:
    """Prefill of a batch of 2 (row 0 left-padded) with an empty past, then one cached decode step;
    compare logits of real tokens with the fp32 torch model."""
    import numpy as np
    import torch
    from transformers import DynamicCache

    runner = OrtDecoderRunner(onnx_path)
    ids, mask, _, _ = _example_inputs(geo, torch.float32, batch=2, seq=6, past=0, left_pad=2, seed=1)
    next_ids = torch.randint(0, geo.vocab_size, (2, 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache_kw = cache_kwarg(reference)
        cache = DynamicCache(config=reference.config)  # transformers' own (sliding layers cropped)
        out = reference(input_ids=ids, attention_mask=mask, position_ids=_positions(mask.numpy(), 6),
                        use_cache=True, **{cache_kw: cache})
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        out2 = reference(input_ids=next_ids, attention_mask=mask2, position_ids=_positions(mask2.numpy(), 1),
                         use_cache=True, **{cache_kw: cache})
    logits, present = runner.forward(ids.numpy(), mask.numpy())
    logits2, _ = runner.forward(next_ids.numpy(), mask2.numpy(), past=present)
    real = mask.numpy()[:, :, None].astype(bool)  # compare non-padding positions only
    ref1, ref2 = out.logits.float().numpy(), out2.logits.float().numpy()
    err = max(float(np.abs(np.where(real, logits - ref1, 0)).max()), float(np.abs(logits2 - ref2).max()))
    if not np.isfinite(logits2).all() or not np.isfinite(np.where(real, logits, 0)).all():
        err = float("inf")
    atol = config.verify_atol
    if atol is None:
        atol = 1e-3 if config.dtype == "fp32" else 2e-2 * max(1.0, float(np.abs(ref1).max()))
    log.info("ONNX vs torch: max abs logits error %.3g (tolerance %.3g)", err, atol)
    if not err <= atol:
        raise ExportMismatchError(
            f"exported graph {onnx_path.name} differs from the torch model: max abs logits error {err:.3g} > "
            f"{atol:.3g} (prefill with padding + one cached decode step). Try exporter='legacy' or "
            f"dtype='fp32', or pass verify_atol= if the difference is expected"
        )


def _positions(mask: "np.ndarray", seq: int) -> "torch.Tensor":
    import torch

    return torch.from_numpy(position_ids_from_mask(mask, seq))


def position_ids_from_mask(attention_mask: "np.ndarray", seq_len: int) -> "np.ndarray":
    """Positions of the last ``seq_len`` tokens: running count of attended tokens minus one (padding
    → 1, as transformers' ``generate`` does). Works for prefill and for cached steps alike."""
    import numpy as np

    mask = np.asarray(attention_mask, dtype=np.int64)
    pos = np.cumsum(mask, axis=-1) - 1
    pos = np.where(mask == 0, 1, pos)
    return np.ascontiguousarray(pos[:, mask.shape[1] - seq_len:]).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------------
KV_NAME_RE = re.compile(r"past_key_values\.(\d+)\.(key|value)")
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}


class OrtDecoderRunner:
    """Runs a merged decoder graph (this module's layout, or optimum's) with onnxruntime.

    ``past`` and ``present`` are lists of ``(key, value)`` arrays, one pair per layer, each
    [batch, kv_heads, length, head_dim].
    """

    def __init__(self, onnx_path: str | os.PathLike, providers: list[str] | None = None,
                 session_options: Any = None) -> None:
        """Open ``onnx_path`` with onnxruntime (``providers`` default: CPUExecutionProvider)."""
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - depends on the environment
            from skipit.errors import BackendUnavailableError

            raise BackendUnavailableError("onnxruntime is not installed: pip install 'skipit[onnx]'") from exc
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise ExportError(f"{self.path} does not exist: export the model first")
        self.session = ort.InferenceSession(
            str(self.path), sess_options=session_options, providers=providers or ["CPUExecutionProvider"]
        )
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = list(inputs)
        self.output_names = [o.name for o in self.session.get_outputs()]
        layers = sorted({int(m.group(1)) for n in inputs if (m := KV_NAME_RE.fullmatch(n))})
        if layers != list(range(len(layers))) or "input_ids" not in inputs:
            raise ExportError(
                f"{self.path.name} is not a merged decoder graph with KV cache (inputs: {self.input_names[:6]}…)"
            )
        self.num_layers = len(layers)
        kv = inputs["past_key_values.0.key"] if layers else None
        self.kv_heads, self.head_dim = (kv.shape[1], kv.shape[3]) if kv is not None else (0, 0)
        if kv is not None and not (isinstance(self.kv_heads, int) and isinstance(self.head_dim, int)):
            raise ExportError(f"{self.path.name}: KV heads / head_dim are not fixed in the graph ({kv.shape})")
        self.kv_dtype = _ORT_DTYPES.get(kv.type if kv is not None else "tensor(float)", "float32")
        self._present_names = kv_output_names(self.num_layers)

    def empty_past(self, batch: int) -> list[tuple["np.ndarray", "np.ndarray"]]:
        """Zero-length past for a prefill (onnxruntime accepts zero-sized tensors)."""
        import numpy as np

        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [(np.zeros(shape, self.kv_dtype), np.zeros(shape, self.kv_dtype)) for _ in range(self.num_layers)]

    def forward(
        self,
        input_ids: "np.ndarray",
        attention_mask: "np.ndarray | None" = None,
        past: "Sequence[tuple[np.ndarray, np.ndarray]] | None" = None,
        position_ids: "np.ndarray | None" = None,
    ) -> tuple["np.ndarray", list[tuple["np.ndarray", "np.ndarray"]]]:
        """One step: logits [batch, seq, vocab] and the present cache (past + these tokens).

        ``attention_mask`` covers past + new tokens (default: all ones); ``position_ids`` default to
        the running count of the mask (left padding handled as in transformers).
        """
        import numpy as np

        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2:
            raise InvalidOptionError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        batch, seq = input_ids.shape
        past = self.empty_past(batch) if past is None else list(past)
        if len(past) != self.num_layers:
            raise InvalidOptionError(f"past has {len(past)} layers, the graph {self.num_layers}")
        past_len = past[0][0].shape[2] if past else 0
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + seq), np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        if attention_mask.shape != (batch, past_len + seq):
            raise InvalidOptionError(
                f"attention_mask must be [batch, past + seq] = {(batch, past_len + seq)}, got {attention_mask.shape}"
            )
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, seq)
        feed: dict[str, np.ndarray] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "position_ids" in self.input_names:
            feed["position_ids"] = np.asarray(position_ids, dtype=np.int64)
        for i, (k, v) in enumerate(past):
            feed[f"past_key_values.{i}.key"] = np.asarray(k, dtype=self.kv_dtype)
            feed[f"past_key_values.{i}.value"] = np.asarray(v, dtype=self.kv_dtype)
        outputs = self.session.run(["logits", *self._present_names], feed)
        flat = outputs[1:]
        return outputs[0], [(flat[2 * i], flat[2 * i + 1]) for i in range(self.num_layers)]

    def generate_greedy(
        self,
        input_ids: "np.ndarray",
        max_new_tokens: int,
        attention_mask: "np.ndarray | None" = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
    ) -> "np.ndarray":
        """Greedy decoding with the KV cache, like transformers' ``generate(do_sample=False)``.

        Returns prompt + new tokens [batch, prompt + n]. With ``eos_token_id``, a finished row is
        continued with ``pad_token_id`` (default: the first EOS id) and decoding stops when every row
        has finished, so the result can be shorter than ``max_new_tokens``.
        """
        import numpy as np

        if max_new_tokens < 0:
            raise InvalidOptionError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
        tokens = np.asarray(input_ids, dtype=np.int64)
        batch = tokens.shape[0]
        mask = np.ones_like(tokens) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        done = np.zeros(batch, dtype=bool)
        past, step_ids = None, tokens
        for _ in range(max_new_tokens):
            logits, past = self.forward(step_ids, mask, past)
            nxt = logits[:, -1, :].argmax(-1).astype(np.int64)
            nxt = np.where(done, pad, nxt)
            tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
            if eos:
                done |= np.isin(nxt, eos)
                if done.all():
                    break
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            step_ids = nxt[:, None]
        return tokens
