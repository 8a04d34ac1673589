"""Hugging Face weights → GGUF tensors: names, the value/layout transforms llama.cpp's converter applies,
and re-quantization to a tensor's own GGML type.

transformers loads a GGUF by dequantizing each tensor and passing it through a per-architecture *tensor
processor* (``transformers.modeling_gguf_pytorch_utils.TENSOR_PROCESSORS``) that undoes what llama.cpp's
``convert_hf_to_gguf.py`` did, then renaming ``blk.{i}.attn_q.weight`` → ``model.layers.{i}.self_attn.q_proj.weight``
with gguf's own tensor-name map. This module runs that backwards, for the architectures in :data:`ARCHES`:

========================  ================================================================================
GGUF architecture         transformers' processor → the inverse applied here
========================  ================================================================================
``llama``                 ``LlamaTensorProcessor``: Q and K rows are permuted from llama.cpp's rotary layout
                          (pairs interleaved per head) to HF's (halves per head) → :func:`permute_qk`
                          (llama.cpp's own ``LlamaModel.permute``), with ``head_count`` for Q and
                          ``head_count_kv`` for K.
``qwen2``, ``qwen3``      the base ``TensorProcessor`` (no change) → none.
``gemma2``, ``gemma3``    ``Gemma2TensorProcessor``: every ``*norm.weight`` is stored as ``w + 1`` and loaded
                          as ``w - 1`` → add 1 (in float32, as transformers subtracts it).
========================  ================================================================================

Any other architecture is refused (:func:`arch_tensors` raises): writing the HF values into it as they
are would silently produce a different model wherever transformers' processor does change them.

Which GGML types can be written back is whatever ``gguf.quants.quantize`` implements (probed once per
type: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and a few ternary/MX types in gguf 0.19). The K-quants
(Q2_K … Q6_K) and i-quants are written only by llama.cpp's ``llama-quantize``; such tensors are written
as F16 instead (:func:`requantize` says so).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from skipit.errors import ExportError

#: Architectures skipit can write HF tensors into, and the transformers processor each inverts.
SUPPORTED = {
    "llama": "LlamaTensorProcessor",
    "qwen2": "TensorProcessor",
    "qwen3": "TensorProcessor",
    "gemma2": "Gemma2TensorProcessor",
    "gemma3": "Gemma2TensorProcessor",
}


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF → llama.cpp rotary layout of a Q or K projection (rows), ``convert_hf_to_gguf.py``'s ``permute``.

    ``n_head`` is the head count of the projection (``head_count`` for Q, ``head_count_kv`` for K). Exact
    inverse of transformers' ``LlamaTensorProcessor._reverse_permute_weights`` (a pure reordering of rows).
    """
    dim = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, 2, dim, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def unpermute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp → HF rotary layout: what transformers does on load (for tests and checks)."""
    dim = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, dim, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)


@dataclass(frozen=True)
class ArchTensors:
    """How one GGUF architecture's tensors relate to the HF model transformers loads from it.

    ``to_gguf(gguf_name, hf_values, block)`` gives the values to store under ``gguf_name`` (GGUF's numpy
    layout, which for these architectures is HF's ``[out, in]``); ``to_hf`` is transformers' direction.
    """

    arch: str
    to_gguf: Callable[[str, np.ndarray, int | None], np.ndarray]
    to_hf: Callable[[str, np.ndarray, int | None], np.ndarray]


def _identity(name: str, values: np.ndarray, block: int | None) -> np.ndarray:
    return values


def _norm_plus_one(name: str, values: np.ndarray, block: int | None) -> np.ndarray:
    return values + np.float32(1) if "norm.weight" in name else values


def _norm_minus_one(name: str, values: np.ndarray, block: int | None) -> np.ndarray:
    return values - np.float32(1) if "norm.weight" in name else values


def _field(fields: dict[str, Any], key: str) -> Any:
    field = fields.get(key)
    return None if field is None else field.contents()


def _llama(fields: dict[str, Any], source: str) -> ArchTensors:
    n_head, n_head_kv = _field(fields, "llama.attention.head_count"), _field(fields, "llama.attention.head_count_kv")

    def heads(name: str, block: int | None) -> int:
        # transformers permutes only when the GGUF gives both counts; without head_count_kv it loads
        # Q/K as stored (still in llama.cpp's layout), so there is nothing consistent to write back
        if n_head is None or n_head_kv is None:
            raise ExportError(f"{source} has no llama.attention.head_count / head_count_kv field; transformers "
                              f"then loads {name} without undoing llama.cpp's rotary permutation, so a trained "
                              "Q/K weight cannot be written back consistently. Ship the safetensors checkpoint")
        count = n_head if ".attn_q." in name else n_head_kv
        if isinstance(count, list):  # per-layer counts: this block's (llama.cpp reads them per layer)
            count = count[block if block is not None else 0]
        return int(count)

    def qk(name: str) -> bool:
        return ".attn_q." in name or ".attn_k." in name  # transformers' test, on the GGUF name

    def to_gguf(name: str, values: np.ndarray, block: int | None) -> np.ndarray:
        return permute_qk(values, heads(name, block)) if qk(name) else values

    def to_hf(name: str, values: np.ndarray, block: int | None) -> np.ndarray:
        return unpermute_qk(values, heads(name, block)) if qk(name) else values

    return ArchTensors("llama", to_gguf, to_hf)


def arch_tensors(arch: str, fields: dict[str, Any], source: str = "the GGUF") -> ArchTensors:
    """The transforms for ``arch`` (``general.architecture``), or :class:`ExportError` if skipit has none."""
    if arch == "llama":
        return _llama(fields, source)
    if arch in ("qwen2", "qwen3"):
        return ArchTensors(arch, _identity, _identity)
    if arch in ("gemma2", "gemma3"):
        return ArchTensors(arch, _norm_plus_one, _norm_minus_one)
    raise ExportError(
        f"cannot write trained (healed) tensors into a {arch} GGUF: skipit inverts transformers' GGUF tensor "
        f"processing only for {', '.join(sorted(SUPPORTED))}. Use the healed safetensors checkpoint in model/ "
        "(convert it with llama.cpp's convert_hf_to_gguf.py and quantize it with llama-quantize), or compress "
        "without --heal to get a GGUF with the source's own tensors"
    )


def _arch_enum(arch: str, gguf: Any) -> Any:
    for key, value in gguf.MODEL_ARCH_NAMES.items():
        if value == arch:
            return key
    raise ExportError(f"the gguf package knows no architecture {arch!r}; upgrade gguf")


def gguf_name_map(arch: str, n_blocks: int, gguf: Any) -> Callable[[str], str | None]:
    """HF parameter name → GGUF tensor name, by gguf's tensor-name map (the one transformers loads with).

    Block numbers are carried over unchanged: ``model.layers.7.mlp.up_proj.weight`` → ``blk.7.ffn_up.weight``.
    """
    name_map = gguf.get_tensor_name_map(_arch_enum(arch, gguf), n_blocks)

    def lookup(hf_name: str) -> str | None:
        found = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        return None if found is None else found[1]

    return lookup


#: a GGUF block tensor's name: ``blk.{i}.{rest}``
GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"(?:.*\.)?layers\.(\d+)\.(.+)")


def hf_block(hf_name: str) -> int | None:
    """The decoder-layer index in an HF parameter name (``model.layers.7.…`` → 7), or None."""
    m = _HF_BLOCK.fullmatch(hf_name)
    return int(m.group(1)) if m else None


@functools.lru_cache(maxsize=None)
def can_quantize(qtype: int) -> bool:
    """Whether ``gguf.quants.quantize`` writes GGML type ``qtype`` (probed on one block of zeros)."""
    import gguf

    t = gguf.GGMLQuantizationType(qtype)
    block = gguf.GGML_QUANT_SIZES[t][0]
    try:
        gguf.quants.quantize(np.zeros((1, block * 8), dtype=np.float32), t)
    except (NotImplementedError, gguf.quants.QuantError, ValueError, TypeError):
        return False
    return True


def requantize(values: np.ndarray, qtype: Any, gguf: Any) -> tuple[np.ndarray, Any, str | None]:
    """``values`` (float32, GGUF numpy layout) as ``qtype`` where gguf can write it, else as F16.

    Returns ``(data, written_type, reason)``: ``data`` goes to ``GGUFWriter.add_tensor(raw_dtype=written_type)``;
    ``reason`` says why the type is not ``qtype`` (None when it is).
    """
    t = gguf.GGMLQuantizationType(qtype)
    values = np.ascontiguousarray(values, dtype=np.float32)
    if can_quantize(int(t)):
        return np.ascontiguousarray(gguf.quants.quantize(values, t)), t, None
    f16 = gguf.GGMLQuantizationType.F16
    finite = np.isfinite(values)
    if not finite.all() or (values.size and float(np.abs(values).max()) > 65504):
        raise ExportError(f"a trained tensor to be written as F16 (its GGML type {t.name} cannot be written) holds "
                          "values outside F16's range; ship the safetensors checkpoint instead")
    return values.astype(np.float16), f16, (f"{t.name} → F16: the gguf package ({_version()}) cannot quantize "
                                            f"{t.name}; only llama.cpp's llama-quantize writes it")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"gguf {version('gguf')}"
    except PackageNotFoundError:
        return "gguf"


def writable_type(name: str, gguf: Any) -> Any:
    """The GGML type called ``name`` (``"Q8_0"``, ``"f16"`` …), if ``gguf.quants.quantize`` writes it; else ExportError."""
    t = getattr(gguf.GGMLQuantizationType, str(name).upper(), None)
    writable = sorted(q.name for q in gguf.GGMLQuantizationType if can_quantize(int(q)))
    if t is None or not can_quantize(int(t)):
        raise ExportError(f"cannot write trained tensors as {name!r}: {_version()} writes {', '.join(writable)}")
    return t


def dequantize(data: np.ndarray, qtype: Any, gguf: Any) -> np.ndarray:
    """A tensor's values as float32 in GGUF's numpy layout."""
    return np.asarray(gguf.quants.dequantize(np.asarray(data), gguf.GGMLQuantizationType(qtype)), dtype=np.float32)


__all__ = ["SUPPORTED", "ArchTensors", "arch_tensors", "can_quantize", "dequantize", "gguf_name_map", "hf_block",
           "permute_qk", "requantize", "unpermute_qk", "writable_type"]
