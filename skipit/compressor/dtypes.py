"""The dtype a model came in, so that the slim checkpoint is saved in it (not in the measurement dtype).

* a safetensors checkpoint: the dtype holding most of its floating-point weights (read from the file
  headers, no tensor is loaded);
* a GGUF file: F32 / F16 / BF16 files keep theirs; a quantized file (Q4_1, Q8_0, K-quants …) has no
  torch dtype of its own and is saved as bfloat16 — its dequantized values need far less than
  bfloat16's precision (a 4-bit step is ~64× the rounding error) and bfloat16 runs fast on CPUs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

#: safetensors dtype names → torch names (floating point only)
_SAFETENSORS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float32"}
#: GGUF ``general.file_type`` values with a torch dtype of their own (llama.cpp's LLAMA_FTYPE_ALL_F32 …)
_GGUF_FILE_TYPES = {0: "float32", 1: "float16", 32: "bfloat16"}
SAVE_DTYPES = ("source", "float32", "float16", "bfloat16")


def source_dtype(source: str | Path) -> str:
    """The torch dtype name the model at ``source`` (a checkpoint folder or a ``.gguf``) is stored in."""
    source = Path(source)
    if source.is_file() and source.suffix == ".gguf":
        from skipit.compressor.gguf_meta import gguf_header_fields

        file_type = gguf_header_fields(source, ("general.file_type",)).get("general.file_type")
        return _GGUF_FILE_TYPES.get(int(file_type) if file_type is not None else -1, "bfloat16")
    counts: dict[str, int] = {}
    for path in sorted(source.glob("*.safetensors")):
        for dtype, n in _header_dtypes(path).items():
            counts[dtype] = counts.get(dtype, 0) + n
    if counts:
        return max(counts, key=counts.get)  # type: ignore[arg-type]
    return "float32"


def _header_dtypes(path: Path) -> dict[str, int]:
    """Elements per floating-point dtype in one safetensors file, from its header alone."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    out: dict[str, int] = {}
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        dtype = _SAFETENSORS.get(entry.get("dtype", ""))
        if dtype:
            n = 1
            for d in entry.get("shape", []):
                n *= int(d)
            out[dtype] = out.get(dtype, 0) + n
    return out


def cast_weights_(model: Any, dtype: str) -> Any:
    """Cast the floating-point *parameters* of ``model`` to ``dtype`` in place, as ``from_pretrained(dtype=…)``
    loads them: buffers (RoPE inverse frequencies and the like, computed in float32 at init) stay as they
    are, unlike ``model.to(dtype)``, which would measure a model no user ever loads."""
    import torch

    target = getattr(torch, dtype)
    fresh: dict[int, Any] = {}
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is None or not param.is_floating_point() or param.dtype == target:
                    continue
                if param.device.type == "meta" or param.is_inference():
                    # an offloaded weight: accelerate's hook re-creates it at each forward (an inference tensor
                    # under inference_mode), which set_data refuses; a new meta parameter of the dtype stands in
                    if id(param) not in fresh:
                        fresh[id(param)] = torch.nn.Parameter(param.data.to(target), requires_grad=param.requires_grad)
                    module._parameters[name] = fresh[id(param)]  # tied weights: one new parameter for all
                else:
                    param.data = param.data.to(target)
    _cast_offloaded(model)
    return model


def _cast_offloaded(model: Any) -> None:
    """Weights accelerate offloaded (meta in the model) are read from its hooks' ``weights_map`` at each forward,
    cast there to the parameter's dtype, but ``save_pretrained`` reads that map as it is: wrap each map so that
    every read comes in the dtype the (meta) parameter now has."""
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        weights = getattr(hook, "weights_map", None)
        if hook is None or weights is None:
            continue
        dtypes = {name: p.dtype for name, p in module.named_parameters(recurse=bool(getattr(hook, "place_submodules", False)))
                  if p.device.type == "meta"}
        if dtypes:
            inner = weights.inner if isinstance(weights, CastingWeights) else weights
            hook.weights_map = CastingWeights(inner, dtypes)


class CastingWeights:
    """A hook's offloaded-weights map whose reads of the named parameters come cast to their dtype."""

    def __init__(self, inner: Any, dtypes: dict[str, Any]) -> None:
        self.inner, self.dtypes = inner, dtypes

    def __getitem__(self, key: str) -> Any:
        value = self.inner[key]
        dtype = self.dtypes.get(key)
        return value.to(dtype) if dtype is not None and value.is_floating_point() and value.dtype != dtype else value

    def __contains__(self, key: object) -> bool:
        return key in self.inner

    def __iter__(self) -> Any:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "dtypes"):  # not set yet (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)
