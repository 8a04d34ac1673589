"""Packaging an export: trace every graph into a staging folder beside the output, save it, copy the config,
tokenizer and processor files, verify, and move everything into place (weights first, graphs last).

Text decoders (one graph) and VLMs (three) go through the same :func:`export_graphs`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from skipit.compat import make_tokenizer_portable
from skipit.errors import ModelLoadError, OutputExistsError
from skipit.exporters.onnx.config import EXTERNAL_DATA_THRESHOLD, OnnxExportConfig
from skipit.exporters.onnx.convention import ONNX_SUBDIR, external_data_name
from skipit.exporters.onnx.trace import Graph, initializer_bytes, strip_debug_metadata, trace

log = logging.getLogger(__name__)

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


def refuse_existing(out_dir: Path, graph_files: Sequence[str], config: OnnxExportConfig) -> dict[str, Path]:
    """``{graph stem: target path}``; :class:`OutputExistsError` if one exists and ``overwrite`` is off."""
    targets = {Path(name).stem: out_dir / ONNX_SUBDIR / name for name in graph_files}
    existing = [p for p in targets.values() if p.exists()]
    if existing and not config.overwrite:
        raise OutputExistsError(f"{existing[0]} exists; choose another out_dir or pass overwrite=True (--overwrite)")
    return targets


def export_graphs(out_dir: Path, graphs: Sequence[Graph], config: OnnxExportConfig, *,
                  metadata: Mapping[str, str], side_files: Callable[[Path], None],
                  verify: Callable[[Path], Any] | None) -> dict[str, str]:
    """Trace ``graphs`` into ``out_dir/onnx`` through a temporary folder inside ``out_dir``; return the route
    each graph took (``{file: route}``).

    Each graph records its route and ``metadata`` in its ONNX metadata; ``side_files(staged_dir)`` adds the
    config/tokenizer files; ``verify(staged_onnx_dir)`` (when ``config.verify``) raises on a mismatch before
    anything is moved into place.
    """
    routes: dict[str, str] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".skipit-onnx-", dir=out_dir) as tmp_name:
        tmp = Path(tmp_name)
        staged = tmp / "staged"
        (staged / ONNX_SUBDIR).mkdir(parents=True)
        for graph in graphs:
            model_ir, route = trace(graph, config, tmp)
            routes[graph.file] = route
            strip_debug_metadata(model_ir)
            model_ir.metadata_props.update({"skipit.exporter": route, **metadata})
            save_graph(model_ir, staged / ONNX_SUBDIR / graph.file, config.external_data)
            del model_ir
        side_files(staged)
        if config.verify and verify is not None:
            verify(staged / ONNX_SUBDIR)
        move_into_place(staged, out_dir, [g.file for g in graphs])
    return routes


def save_graph(model_ir: Any, path: Path, external: bool | None) -> None:
    """Save one graph; weights go to ``<graph>_data`` when ``external`` (None: when above 1 GiB)."""
    import onnx_ir as ir

    if external is None:
        external = initializer_bytes(model_ir) > EXTERNAL_DATA_THRESHOLD
    if external:
        ir.save(model_ir, path, external_data=external_data_name(path.name))
    else:
        ir.save(model_ir, path)


def copy_side_files(model_dir: Path, dest: Path, *, processor: bool = False) -> None:
    """config.json, generation_config.json and tokenizer files (and with ``processor`` the image processor's
    and chat-template files too), for optimum / transformers.js / onnxruntime-genai.

    transformers 5.x writes ``"tokenizer_class": "TokenizersBackend"``, which transformers 4.x (optimum's
    environment) refuses; with a ``tokenizer.json`` present the copy says ``PreTrainedTokenizerFast``,
    which every client loads (:func:`skipit.compat.make_tokenizer_portable`).
    """
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} has no config.json")
    copied = []
    for name in (*_CONFIG_FILES, *_TOKENIZER_FILES):
        src = model_dir / name
        if src.is_file():
            shutil.copy2(src, dest / name)
            copied.append(name)
    if processor:
        from skipit.compressor.loading import PROCESSOR_FILE_PATTERNS

        for pattern in PROCESSOR_FILE_PATTERNS:
            for src in model_dir.glob(pattern):
                if src.is_file() and not (dest / src.name).exists():
                    shutil.copy2(src, dest / src.name)
    make_tokenizer_portable(dest, replace=("TokenizersBackend",))
    if not any(n in copied for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")):
        log.warning("%s has no tokenizer files; the ONNX folder will need a tokenizer from elsewhere", model_dir)


def move_into_place(staged: Path, out_dir: Path, graph_files: Sequence[str]) -> None:
    """Move every staged file to the same place under ``out_dir`` (``os.replace``: atomic per file): side files
    and weights first, then the graphs in ``graph_files`` order, so a reader never sees a new graph next to
    old weights."""
    onnx_dir = out_dir / ONNX_SUBDIR
    onnx_dir.mkdir(parents=True, exist_ok=True)
    for name in graph_files:  # an earlier, larger export's weights must not linger
        stale = onnx_dir / external_data_name(name)
        if stale.exists() and not (staged / ONNX_SUBDIR / stale.name).exists():
            stale.unlink()
    order = {name: i + 1 for i, name in enumerate(graph_files)}
    files = sorted((p for p in staged.rglob("*") if p.is_file()), key=lambda p: order.get(p.name, 0))
    for src in files:
        dst = out_dir / src.relative_to(staged)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
