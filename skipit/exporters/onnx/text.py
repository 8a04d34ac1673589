"""ONNX export of a text decoder checkpoint: one merged prefill + decode graph with KV cache.

What gets written
-----------------
``export_text_decoder(model_dir, out_dir)`` writes a directory that loads unchanged in optimum's
``ORTModelForCausalLM.from_pretrained(out_dir)`` and in transformers.js (``onnx/model.onnx`` is its
default file name)::

    out_dir/
        config.json, generation_config.json        copied from model_dir
        tokenizer.json, tokenizer_config.json, …    copied when present
        onnx/model.onnx                             the graph
        onnx/model.onnx_data                        the weights, only when large (external data)
        genai_config.json                           for onnxruntime-genai (og.Model(out_dir)), see skipit.exporters.genai

In skipit's pipeline this is ``export_text_decoder(slim_dir, OUT / "onnx")``: ``OUT/onnx`` is then a
self-contained ONNX model folder. The graph follows :mod:`skipit.exporters.onnx.convention` (optimum's
``text-generation-with-past``): prefill passes a past of length 0, which onnxruntime accepts (measured).
TensorRT does not: see :func:`skipit.runtime.tensorrt.with_dummy_past` for the masked one-slot workaround,
which this graph supports because positions come from ``position_ids`` and masking from ``attention_mask``.
Every export is verified against the torch model with onnxruntime (a left-padded prefill batch, then one
cached decode step) unless ``verify=False``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from skipit.errors import ExportError
from skipit.exporters.onnx.config import OnnxExportConfig
from skipit.exporters.onnx.convention import MODEL_FILE, ONNX_SUBDIR, decoder_io
from skipit.exporters.onnx.model import decoder_example, decoder_wrapper, kv_geometry, load_for_export, read_config
from skipit.exporters.onnx.package import copy_side_files, export_graphs, refuse_existing
from skipit.exporters.onnx.trace import Graph

log = logging.getLogger(__name__)

# Example sizes used for tracing: distinct and > 1 so no dimension is specialised to 0/1 or unified.
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 4


def export_text_decoder(
    model_dir: str | os.PathLike, out_dir: str | os.PathLike, config: OnnxExportConfig = OnnxExportConfig()
) -> Path:
    """Export a Hugging Face text decoder checkpoint to ``out_dir/onnx/model.onnx`` with KV cache.

    Also copies ``config.json``, ``generation_config.json`` and the tokenizer files (those present) into
    ``out_dir``, so that ``out_dir`` loads unchanged in optimum and transformers.js. The number of KV
    inputs follows the checkpoint's ``num_hidden_layers`` (a slim checkpoint gets fewer). Files are
    built in a temporary folder inside ``out_dir`` and moved into place at the end.

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
    import copy

    import torch

    from skipit.exporters.genai import write_genai_config
    from skipit.exporters.onnx.verify import verify_text

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    target = refuse_existing(out_dir, (MODEL_FILE,), config)["model"]
    started = time.perf_counter()
    raw = read_config(model_dir)
    if "vision_config" in raw or "audio_config" in raw:
        raise ExportError(
            f"{model_dir} is a multimodal checkpoint ({', '.join(raw.get('architectures') or ['?'])}); "
            f"export_text_decoder exports text decoders only. VLMs need split graphs (vision encoder, "
            f"token embeddings, decoder taking inputs_embeds): export_vlm"
        )
    reference, arch, record = load_for_export(model_dir, config)
    geo = kv_geometry(reference)
    dtype = torch.float16 if config.dtype == "fp16" else torch.float32
    model = copy.deepcopy(reference).to(dtype) if config.dtype == "fp16" else reference
    log.info("exporting %s (%d layers, %d KV heads × %d) to ONNX opset %d, %s, %s",
             model_dir, geo.num_layers, geo.kv_heads, geo.head_dim, config.opset, config.dtype,
             "optimum" if config.backend == "optimum" else f"exporter={config.exporter}")

    inputs, outputs, axes = decoder_io(geo.num_layers)
    graph = Graph("decoder", MODEL_FILE, None, (), inputs, outputs, axes, named_dims=True,
                  routes=record.routes_for(arch or "text decoder", "decoder", config))
    if config.backend == "optimum":
        graph.build = lambda tmp: _optimum(model_dir, tmp, config)
    else:
        graph.wrapper = decoder_wrapper(model)
        graph.args = decoder_example(geo, dtype, EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST)

    def side_files(staged: Path) -> None:
        copy_side_files(model_dir, staged)
        write_genai_config(staged, f"{ONNX_SUBDIR}/{MODEL_FILE}", strict=False)  # onnxruntime-genai loads out_dir as is

    routes = export_graphs(out_dir, [graph], config,
                           metadata={"skipit.num_hidden_layers": str(geo.num_layers), "skipit.dtype": config.dtype},
                           side_files=side_files,
                           verify=lambda onnx_dir: verify_text(reference, onnx_dir / MODEL_FILE, geo, config))
    log.info("ONNX export of %s done in %.1f s (%s exporter): %s", model_dir.name,
             time.perf_counter() - started, routes[MODEL_FILE], target)
    return target


def _optimum(model_dir: Path, tmp: Path, config: OnnxExportConfig) -> tuple[Any, str]:
    from skipit.exporters.onnx.optimum import export_with_optimum

    return export_with_optimum(model_dir, tmp, config.opset), "optimum"
