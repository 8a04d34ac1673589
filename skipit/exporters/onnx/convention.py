"""The graph convention every skipit ONNX export follows: file layout, input/output names, dimension names.

Text decoders and VLMs share one convention (optimum's ``text-generation-with-past``, and the split layout
SmolVLM and transformers.js ship); the runners in :mod:`skipit.runtime` and the TensorRT exporter read
graphs by these names.

Layout of an export folder ``OUT``::

    OUT/config.json, generation_config.json, tokenizer / processor files
    OUT/onnx/model.onnx                    a text decoder: one merged graph with KV cache
    OUT/onnx/vision_encoder.onnx           a VLM: vision tower + projector …
    OUT/onnx/embed_tokens.onnx             … token embeddings …
    OUT/onnx/decoder_model_merged.onnx     … and the language decoder with KV cache
    OUT/onnx/<graph>.onnx_data             a graph's weights, only when large (external data)

The decoder graph takes ``input_ids`` (text) or ``inputs_embeds`` (VLM), ``attention_mask`` [batch,
past + sequence], ``position_ids`` ([batch, sequence]; [3, batch, sequence] for multimodal RoPE) and
``past_key_values.{i}.key/value`` [batch, kv_heads, past, head_dim] for every layer ``i`` of the (slim)
config; it returns ``logits`` and ``present.{i}.key/value`` (the past with the new tokens appended).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from skipit.errors import ExportError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

ONNX_SUBDIR = "onnx"
MODEL_FILE = "model.onnx"
VISION_FILE = "vision_encoder.onnx"
EMBED_FILE = "embed_tokens.onnx"
DECODER_FILE = "decoder_model_merged.onnx"
#: The graphs of a split VLM export, in the order they are moved into place (decoder last).
GRAPH_FILES = (VISION_FILE, EMBED_FILE, DECODER_FILE)
EXTERNAL_DATA_SUFFIX = "_data"
EXTERNAL_DATA_FILE = MODEL_FILE + EXTERNAL_DATA_SUFFIX

# Dimension names of the graphs' inputs and outputs. skipit.exporters.tensorrt recognises these (and optimum's).
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
PRESENT_LEN = f"{PAST} + {SEQ}"  # what the dynamo exporter derives for present.*; legacy is told the same
NUM_IMAGES, NUM_PATCHES, IMAGE_TOKENS = "num_images", "num_patches", "num_image_tokens"

#: ``past_key_values.{i}.key/value`` and ``present.{i}.key/value``: the layer index and the kind.
KV_NAME_RE = re.compile(r"past_key_values\.(\d+)\.(key|value)")
PRESENT_NAME_RE = re.compile(r"present\.(\d+)\.(key|value)")
#: onnxruntime's element types → numpy dtype names.
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def external_data_name(graph_file: str) -> str:
    """Where a graph's weights go when they are stored outside it: ``model.onnx`` → ``model.onnx_data``."""
    return graph_file + EXTERNAL_DATA_SUFFIX


def kv_input_names(num_layers: int) -> list[str]:
    """``past_key_values.{i}.key/value`` for every layer, in graph order."""
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def kv_output_names(num_layers: int) -> list[str]:
    """``present.{i}.key/value`` for every layer, in graph order."""
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def kv_layers(names: list[str]) -> list[int]:
    """The layer indices of the ``past_key_values.*`` names among ``names``, sorted."""
    return sorted({int(m.group(1)) for n in names if (m := KV_NAME_RE.fullmatch(n))})


def decoder_io(num_layers: int, first_input: str = "input_ids", mrope: bool = False
               ) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    """(input names, output names, dynamic axes of inputs and outputs) of a merged decoder graph."""
    axes: dict[str, dict[int, str]] = {
        first_input: {0: BATCH, 1: SEQ},
        "attention_mask": {0: BATCH, 1: TOTAL},
        "position_ids": {1: BATCH, 2: SEQ} if mrope else {0: BATCH, 1: SEQ},
        "logits": {0: BATCH, 1: SEQ},
    }
    axes.update({n: {0: BATCH, 2: PAST} for n in kv_input_names(num_layers)})
    axes.update({n: {0: BATCH, 2: PRESENT_LEN} for n in kv_output_names(num_layers)})
    inputs = [first_input, "attention_mask", "position_ids", *kv_input_names(num_layers)]
    return inputs, ["logits", *kv_output_names(num_layers)], axes


def position_ids_from_mask(attention_mask: "np.ndarray", seq_len: int) -> "np.ndarray":
    """Positions of the last ``seq_len`` tokens: running count of attended tokens minus one (padding
    → 1, as transformers' ``generate`` does). Works for prefill and for cached steps alike."""
    import numpy as np

    mask = np.asarray(attention_mask, dtype=np.int64)
    pos = np.cumsum(mask, axis=-1) - 1
    pos = np.where(mask == 0, 1, pos)
    return np.ascontiguousarray(pos[:, mask.shape[1] - seq_len:]).astype(np.int64)


def find_split_export(path: str | os.PathLike) -> tuple[Path, Path] | None:
    """``(folder with config.json, folder with the three graphs)`` of a split export at ``path`` — the export
    folder, its ``onnx/`` folder or one of its graph files — or None when ``path`` is no split export."""
    path = Path(path)
    if path.is_file():
        candidates = [path.parent] if path.name in GRAPH_FILES else []
    else:  # skipit-compress writes OUT/onnx/{config.json, onnx/*.onnx}
        candidates = [path / ONNX_SUBDIR, path, path / ONNX_SUBDIR / ONNX_SUBDIR]
    for onnx_dir in candidates:
        if all((onnx_dir / name).is_file() for name in GRAPH_FILES):
            for root in (onnx_dir.parent, onnx_dir):
                if (root / "config.json").is_file():
                    return root, onnx_dir
            raise ExportError(f"{onnx_dir} holds split VLM graphs but no config.json beside them (looked in "
                              f"{onnx_dir.parent} and {onnx_dir}); give the folder export_vlm wrote")
    return None
