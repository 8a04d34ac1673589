"""How to export (:class:`OnnxExportConfig`), and the tolerance an export is verified with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from skipit.errors import InvalidOptionError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

EXPORTERS = ("dynamo", "legacy", "auto")
BACKENDS = ("torch", "optimum")
DTYPES = ("fp32", "fp16")
# Weights above this size go to <graph>.onnx_data (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30


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
            < 4.58; see :mod:`skipit.exporters.onnx.optimum`). Both are verified the same way.
        external_data: write weights to ``<graph>.onnx_data``; ``None`` decides by size (> 1 GiB).
        verify: run the graphs with onnxruntime after export and compare with torch; raise on mismatch.
        verify_atol: allowed max abs error; ``None``: 1e-3 for fp32, 2e-2 × max(1, |reference|) for fp16.
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
        if self.dtype not in DTYPES:
            raise InvalidOptionError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise InvalidOptionError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "optimum" and self.dtype != "fp32":
            raise InvalidOptionError("--backend optimum exports fp32 on the CPU (optimum's fp16 export needs CUDA); "
                                     "use --backend torch for --dtype fp16")
        if self.exporter not in EXPORTERS:
            raise InvalidOptionError(f"exporter must be one of {', '.join(EXPORTERS)}, got {self.exporter!r}")
        if not 14 <= self.opset <= 23:
            raise InvalidOptionError(
                f"opset must be between 14 and 23, got {self.opset}; 18 is the tested default (TensorRT-friendly)"
            )
        if self.verify_atol is not None and not self.verify_atol > 0:
            raise InvalidOptionError(f"verify_atol must be > 0, got {self.verify_atol}")

    def tolerance(self, reference: "np.ndarray") -> float:
        """Allowed max abs error against ``reference`` (see ``verify_atol``)."""
        import numpy as np

        if self.verify_atol is not None:
            return self.verify_atol
        return 1e-3 if self.dtype == "fp32" else 2e-2 * max(1.0, float(np.abs(reference).max()))
