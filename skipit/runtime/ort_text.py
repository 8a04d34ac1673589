"""onnxruntime runner of a merged text decoder graph (:mod:`skipit.exporters.onnx.convention`, or optimum's)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skipit.errors import ExportError
from skipit.exporters.onnx.convention import ORT_DTYPES, kv_layers
from skipit.runtime.decoder import MergedDecoder
from skipit.runtime.ort import ort_session

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


class OrtDecoderRunner(MergedDecoder):
    """Runs a merged decoder graph with onnxruntime (see :class:`~skipit.runtime.decoder.MergedDecoder`)."""

    def __init__(self, onnx_path: str | os.PathLike, providers: list[str] | None = None,
                 session_options: Any = None) -> None:
        """Open ``onnx_path`` with onnxruntime (``providers`` default: CPUExecutionProvider)."""
        self.path = Path(onnx_path)
        self.session = ort_session(self.path, providers, session_options)
        self.providers = providers or ["CPUExecutionProvider"]
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = list(inputs)
        self.output_names = [o.name for o in self.session.get_outputs()]
        layers = kv_layers(self.input_names)
        if layers != list(range(len(layers))) or "input_ids" not in inputs:
            raise ExportError(
                f"{self.path.name} is not a merged decoder graph with KV cache (inputs: {self.input_names[:6]}…)"
            )
        self.num_layers = len(layers)
        kv = inputs["past_key_values.0.key"] if layers else None
        self.kv_heads, self.head_dim = (kv.shape[1], kv.shape[3]) if kv is not None else (0, 0)
        if kv is not None and not (isinstance(self.kv_heads, int) and isinstance(self.head_dim, int)):
            raise ExportError(f"{self.path.name}: KV heads / head_dim are not fixed in the graph ({kv.shape})")
        self.kv_dtype = ORT_DTYPES.get(kv.type if kv is not None else "tensor(float)", "float32")
        self.vocab_size = self.session.get_outputs()[0].shape[-1]

    def _run(self, output_names: list[str], feed: dict[str, "np.ndarray"]) -> list["np.ndarray"]:
        return self.session.run(output_names, feed)
