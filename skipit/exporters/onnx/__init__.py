"""ONNX export, one path for every graph: convention → model and cache plumbing → trace → package → verify.

========================  ==================================================================================
module                    what it holds
========================  ==================================================================================
``convention``            file layout, input/output and dimension names every export follows
``config``                :class:`OnnxExportConfig` (and the verification tolerance)
``archs``                 one :class:`~skipit.exporters.onnx.archs.OnnxConfig` record per architecture
``model``                 loading for export, KV geometry, the decoder wrapper and its example inputs
``qwen_vision``           Qwen2-VL / 2.5-VL vision helpers that trace
``trace``                 one graph → ``onnx_ir`` model, with route fallback and I/O check
``package``               staging, saving, side files, moving into place
``verify``                the graphs against torch with onnxruntime
``text`` / ``vlm``        the one-graph (text decoder) and three-graph (VLM) exports
``optimum``               optimum's exporter as another way to build the text graph (``--backend optimum``)
========================  ==================================================================================

A text decoder is the one-graph case of what a VLM export does.
"""

from skipit.exporters.onnx.archs import ONNX_CONFIGS, OnnxConfig, onnx_config, supported_vlm_architectures
from skipit.exporters.onnx.config import OnnxExportConfig
from skipit.exporters.onnx.convention import DECODER_FILE, EMBED_FILE, GRAPH_FILES, MODEL_FILE, ONNX_SUBDIR
from skipit.exporters.onnx.convention import VISION_FILE, find_split_export, kv_input_names, kv_output_names
from skipit.exporters.onnx.convention import position_ids_from_mask
from skipit.exporters.onnx.text import export_text_decoder
from skipit.exporters.onnx.vlm import export_vlm

__all__ = [
    "DECODER_FILE", "EMBED_FILE", "GRAPH_FILES", "MODEL_FILE", "ONNX_CONFIGS", "ONNX_SUBDIR", "VISION_FILE",
    "OnnxConfig", "OnnxExportConfig", "export_text_decoder", "export_vlm", "find_split_export", "kv_input_names",
    "kv_output_names", "onnx_config", "position_ids_from_mask", "supported_vlm_architectures",
]
