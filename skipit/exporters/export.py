"""One entry point per export stage: ``export_onnx`` (text or VLM, chosen from the checkpoint) and
``build_engines`` (TensorRT engines for every graph of an ONNX export)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from skipit.errors import ExportError
from skipit.exporters.onnx.convention import DECODER_FILE, EMBED_FILE, MODEL_FILE, VISION_FILE

log = logging.getLogger(__name__)

#: Graph files of an export, in the order engines are built (VLM split graphs, then a text decoder).
GRAPH_FILES = (DECODER_FILE, EMBED_FILE, VISION_FILE, MODEL_FILE)
_DEFAULT_PROFILES = "prefill=1x1..1x512..1x2048,decode=1x1..1x1..4x1"


def is_vlm_checkpoint(model_dir: Path) -> bool:
    """Whether a checkpoint directory holds a vision-language model (its config nests a text config)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ExportError(f"{model_dir} is not a model directory (no config.json); give the slim model/ folder")
    config = json.loads(path.read_text())
    return "vision_config" in config and "text_config" in config


def export_onnx(model_dir: str | Path, out_dir: str | Path, config: Any = None) -> dict[str, Path]:
    """Export a checkpoint to ONNX in ``out_dir`` (graphs under ``out_dir/onnx``); return the graphs.

    Text decoders get one merged graph with KV cache (``onnx/model.onnx``); VLMs get split graphs
    (``vision_encoder.onnx``, ``embed_tokens.onnx``, ``decoder_model_merged.onnx``).
    """
    from skipit.exporters.onnx import OnnxExportConfig, export_text_decoder, export_vlm

    config = config or OnnxExportConfig()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if is_vlm_checkpoint(model_dir):
        if config.backend != "torch":
            raise ExportError(f"--backend {config.backend} exports text decoders only (optimum refuses LLaVA, "
                              "Qwen2-VL and Idefics3); VLM split graphs use --backend torch")

        return export_vlm(model_dir, out_dir, config)
    return {"model": export_text_decoder(model_dir, out_dir, config)}


def find_graphs(onnx_dir: str | Path) -> list[Path]:
    """The ONNX graphs of an export (``DIR/onnx/*.onnx`` or ``DIR/*.onnx``); a clear error if none."""
    root = Path(onnx_dir)
    if root.is_file() and root.suffix == ".onnx":
        return [root]
    for folder in (root / "onnx", root):
        graphs = [folder / name for name in GRAPH_FILES if (folder / name).is_file()]
        if graphs:
            return graphs
    raise ExportError(
        f"{onnx_dir} holds no ONNX graphs (looked for {', '.join(GRAPH_FILES)} in it and in its onnx/ folder); "
        "export first with `skipit export MODEL_DIR OUT_DIR`"
    )


def build_engines(onnx_dir: str | Path, engines_dir: str | Path, *, profiles: str | Sequence[str] | None = None,
                  precision: str = "fp16", max_context: int | None = None, timing_cache: Path | None = None,
                  opset: int | None = None) -> list[Path]:
    """Check every graph for TensorRT compatibility, then build one engine per graph (GPU + TensorRT).

    The compatibility check runs everywhere; the build raises ``BackendUnavailableError`` with install
    instructions where TensorRT or CUDA is missing.
    """
    from skipit.exporters.tensorrt import as_profiles, build_engine, check_trt_compatibility

    specs = as_profiles(profiles or _DEFAULT_PROFILES)
    graphs = find_graphs(onnx_dir)
    for graph in graphs:
        report = check_trt_compatibility(graph, opset=opset)
        for warning in report.warnings:
            log.warning("%s: %s", graph.name, warning)
        report.raise_for_problems()
    engines = []
    for graph in graphs:
        if graph.name == VISION_FILE:
            engines.append(build_engine(graph, engines_dir, "prefill=1x1", precision, timing_cache, max_context=max_context))
        else:
            engines.append(build_engine(graph, engines_dir, specs, precision, timing_cache, max_context=max_context))
    return engines
