"""GGUF in → GGUF out: drop decoder blocks from a GGUF file without touching the kept weights.

``export_gguf(source_gguf, removed, out_path)`` writes a copy of ``source_gguf`` in which

* the tensors of the removed blocks (``blk.{i}.*``) are gone and the kept blocks are renumbered
  ``blk.0 … blk.{L-k-1}`` in their original order;
* ``<arch>.block_count`` is ``L - k``, and every per-layer metadata array under ``<arch>.`` (an array
  as long as ``block_count``: head counts per layer, sliding-window patterns, …) keeps the entries of
  the kept blocks; ``<arch>.leading_dense_block_count`` counts the kept dense blocks;
* every kept tensor keeps its bytes, shape and quantization type (Q4_1 stays Q4_1; nothing is
  dequantized or re-quantized), and every other metadata field (tokenizer, chat template, RoPE,
  ``general.*``) is copied as stored, strings byte for byte.

The file is written next to ``out_path`` under a temporary name, read back and checked (tensor
count, block count, per-layer arrays, the bytes and type of every kept tensor, every copied field),
then renamed into place, so ``out_path`` is either the old file or a complete, checked new one.

With ``replace`` (e.g. after healing), some kept tensors are written from Hugging Face weights instead:
each is mapped to its GGUF tensor (``model.layers.15.self_attn.q_proj.weight`` → ``blk.15.attn_q.weight``,
before renumbering), put back into llama.cpp's layout (the inverse of what transformers does when it
loads the GGUF; see :mod:`skipit.exporters.gguf_tensors` for the architectures this is implemented for)
and re-quantized to the source tensor's own GGML type (or to ``replace_type``), or written as F16 where the
``gguf`` package cannot write that type (K-quants, i-quants); :attr:`GgufExport.healed` records which, the
re-quantization error and how much of the change from the source tensor the written values keep. Every
other tensor keeps its bytes.

Block indices are those of the Hugging Face model loaded from the same GGUF (transformers maps
``blk.{i}`` to ``model.layers.{i}``), i.e. a certificate's ``layers``. Architectures for which
llama.cpp derives per-layer behaviour from the layer index rather than from metadata are handled
explicitly (see ``_INDEX_PATTERNS``): a removal that would move a kept layer from a full-attention slot
to a sliding-window slot is refused instead of written.
"""

from __future__ import annotations

import logging
import numbers
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from skipit.atomic import atomic_file
from skipit.errors import BackendUnavailableError, ExportError
from skipit.exporters.gguf_replace import Replacement, plan_replacements, slim_model_tensors
from skipit.exporters.gguf_tensors import GGUF_BLOCK as _BLOCK_RE

log = logging.getLogger(__name__)

# Per-layer arrays are recognised by length; these arrays under <arch>. are not per layer.
_NOT_PER_LAYER = frozenset({"rope.dimension_sections"})
# llama.cpp decides which layers use sliding-window attention from the layer index for these
# architectures (hparams.set_swa_pattern(period) in its model loader: layer i slides when
# i % period < period - 1), unless the GGUF carries a per-layer ``attention.sliding_window_pattern``
# array (sliced like any per-layer array). A scalar ``attention.sliding_window_pattern`` overrides
# the period where llama.cpp reads it.
_INDEX_PATTERNS = {"gemma2": 2, "gemma3": 6, "cohere2": 4}
# Architectures with per-layer data outside blk.N that cannot be sliced without re-quantizing.
_REFUSED = {
    "gemma3n": "its per_layer_token_embd / per_layer_model_proj tensors hold one slice per layer outside blk.N",
}


@dataclass(frozen=True)
class GgufExport:
    """What :func:`export_gguf` wrote (``path``) and what it changed.

    ``as_dict()`` is for the manifest: it names the file (``file``), not its absolute path, which points
    into a staging folder while the pipeline runs.

    ``healed`` (only when tensors were replaced, else None and left out of ``as_dict()``): ``type``
    (``"source"`` or the ``replace_type``), ``tensors`` (how many), ``blocks`` (original numbering),
    ``written_types`` ({GGML type: count}), ``f16_fallback`` ({output tensor name: why it is F16 and not
    its source type}), ``requant_error`` (``max_abs``/``mean_abs`` of written − given, in the file's
    layout), ``largest_change`` (‖given − source‖ / ‖source‖ and the output tensor name), and
    ``change_kept`` (⟨written − source, given − source⟩ / ‖given − source‖²: the share of what training
    changed that the file keeps; 1 = all, 0 = re-quantization rounded it back to the source's values).
    """

    path: Path
    architecture: str
    block_count_before: int
    block_count_after: int
    removed: tuple[int, ...]
    tensors: int
    size_bytes: int
    source_size_bytes: int
    sliced_keys: tuple[str, ...]
    #: with ``replace``: what was written from the given weights (see :func:`export_gguf`); None without
    healed: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["file"] = self.path.name
        del d["path"]
        if d["healed"] is None:
            del d["healed"]
        return d


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise BackendUnavailableError(
            "writing a GGUF needs the gguf package: pip install 'skipit[gguf]'"
        ) from exc
    return gguf


# --------------------------------------------------------------------------------------------------
# Reading fields as writable values
# --------------------------------------------------------------------------------------------------
def _field_value(field: Any, gguf: Any) -> Any:
    """The value of a reader field in the form GGUFWriter.add_key_value takes it back.

    Strings stay bytes (GGUFWriter writes bytes as given), so a token that is not valid UTF-8
    survives unchanged.
    """
    vt = gguf.GGUFValueType
    main = field.types[0]
    if main == vt.STRING:
        return bytes(field.parts[field.data[0]])
    if main == vt.ARRAY:
        if field.types[-1] == vt.STRING:
            return [bytes(field.parts[i]) for i in field.data]
        if len(field.types) > 2:
            raise ExportError(f"GGUF field {field.name} is a nested array, which gguf's writer cannot copy")
        return field.contents()
    return field.contents()


def _field_bytes(field: Any) -> bytes:
    """The field's stored encoding (type tags, lengths, values), without its key."""
    return b"".join(bytes(p.tobytes()) for p in field.parts[2:])


def _scalar(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


# --------------------------------------------------------------------------------------------------
# The plan: which tensors go where, which fields change
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    arch: str
    n_blocks: int
    kept: tuple[int, ...]  # original block indices, in order
    renamed: dict[str, str]  # source tensor name → output name (kept tensors only)
    changed: dict[str, Any]  # field key → new value (block_count, sliced arrays, …)
    dropped_empty: tuple[str, ...]  # empty arrays gguf's writer cannot write


def _plan(reader: Any, source: Path, removed: Sequence[int], gguf: Any) -> _Plan:
    arch = _scalar(reader, "general.architecture")
    if not arch:
        raise ExportError(f"{source} has no general.architecture field; it is not a model GGUF")
    split = _scalar(reader, "split.count")
    if split and int(split) > 1:
        raise ExportError(f"{source} is shard 1 of a {split}-file split GGUF; merge it first "
                          "(llama-gguf-split --merge) and pass the merged file")
    if arch in _REFUSED:
        raise ExportError(f"cannot drop blocks from a {arch} GGUF: {_REFUSED[arch]}. Use the safetensors "
                          "checkpoint in model/ (convert it with llama.cpp's convert_hf_to_gguf.py)")
    count_key = f"{arch}.block_count"
    n = _scalar(reader, count_key)
    if n is None:
        raise ExportError(f"{source} ({arch}) has no {count_key} field; cannot tell which tensors are decoder blocks")
    n = int(n)

    blocks: dict[int, list[str]] = {}
    for t in reader.tensors:
        m = _BLOCK_RE.fullmatch(t.name)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(t.name)
    if sorted(blocks) != list(range(n)):
        found = sorted(blocks)
        extra = sorted(set(found) - set(range(n)))
        missing = sorted(set(range(n)) - set(found))
        raise ExportError(
            f"{source}: {count_key} is {n} but the file holds tensors for blocks "
            f"{_ranges(found) or 'none'} (missing: {_ranges(missing) or 'none'}; beyond block_count: "
            f"{_ranges(extra) or 'none'}). The file is inconsistent or truncated; re-download or re-convert it"
        )

    bad = sorted((i for i in set(removed) if not (isinstance(i, numbers.Integral) and 0 <= i < n)), key=str)
    if bad:
        raise ExportError(f"blocks {bad} are not in {source} (it has blocks 0..{n - 1}); "
                          "pass the removed layers in original numbering (the certificate's layers)")
    drop = {int(i) for i in removed}
    if len(drop) >= n:
        raise ExportError(f"removing {len(drop)} of {n} blocks leaves no decoder block; keep at least one")
    nextn = int(_scalar(reader, f"{arch}.nextn_predict_layers") or 0)
    if nextn and drop & set(range(n - nextn, n)):
        raise ExportError(f"blocks {sorted(drop & set(range(n - nextn, n)))} of {source} are its "
                          f"{nextn} multi-token-prediction blocks, not decoder layers; they cannot be removed")
    kept = tuple(i for i in range(n) if i not in drop)
    _check_index_patterns(reader, arch, n, kept, gguf)

    renamed = {t.name: t.name for t in reader.tensors if not _BLOCK_RE.fullmatch(t.name)}
    for new, old in enumerate(kept):
        for name in blocks[old]:
            renamed[name] = f"blk.{new}.{_BLOCK_RE.fullmatch(name).group(2)}"  # type: ignore[union-attr]

    changed: dict[str, Any] = {count_key: len(kept)}
    dropped_empty = []
    vt = gguf.GGUFValueType
    for key, field in reader.fields.items():
        if field.types and field.types[0] == vt.ARRAY and len(field.data) == 0:
            dropped_empty.append(key)
            continue
        if (key.startswith(f"{arch}.") and key[len(arch) + 1:] not in _NOT_PER_LAYER and field.types
                and field.types[0] == vt.ARRAY and len(field.data) == n):
            values = _field_value(field, gguf)
            changed[key] = [values[i] for i in kept]
    dense = _scalar(reader, f"{arch}.leading_dense_block_count")
    if dense is not None:
        changed[f"{arch}.leading_dense_block_count"] = sum(1 for i in kept if i < int(dense))
    return _Plan(arch, n, kept, renamed, changed, tuple(dropped_empty))


def _check_index_patterns(reader: Any, arch: str, n: int, kept: Sequence[int], gguf: Any) -> None:
    """Refuse removals after which llama.cpp would give a kept layer the other attention type."""
    key = f"{arch}.attention.sliding_window_pattern"
    field = reader.fields.get(key)
    if field is not None and field.types[0] == gguf.GGUFValueType.ARRAY:
        return  # per-layer array: sliced with the blocks
    period = int(field.contents()) if field is not None else _INDEX_PATTERNS.get(arch)
    if not period:
        return

    def sliding(i: int) -> bool:
        return i % period < period - 1

    moved = [(old, new) for new, old in enumerate(kept) if sliding(old) != sliding(new)]
    if moved:
        old, new = moved[0]
        kind = {True: "sliding-window", False: "full-attention"}
        raise ExportError(
            f"llama.cpp picks {arch}'s sliding-window layers from the layer index (every {period}th layer is "
            f"full attention); after this removal, original block {old} ({kind[sliding(old)]}) would run as "
            f"block {new} ({kind[sliding(new)]}) — {len(moved)} kept blocks would change attention type, so the "
            f"slim GGUF would compute a different model. Remove whole groups of {period} consecutive layers "
            f"aligned to the pattern, or ship the safetensors/ONNX output instead"
        )


def _ranges(values: Sequence[int]) -> str:
    """[0, 1, 2, 5] → '0-2, 5'."""
    import itertools

    runs = [[v for _, v in g] for _, g in itertools.groupby(enumerate(sorted(values)), lambda p: p[1] - p[0])]
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def export_gguf(source_gguf: str | os.PathLike, removed: Sequence[int], out_path: str | os.PathLike,
                replace: Mapping[str, Any] | None = None, *, replace_type: str | None = None) -> GgufExport:
    """Write ``source_gguf`` without the decoder blocks ``removed`` to ``out_path`` (see module docstring).

    Args:
        source_gguf: the GGUF the model was loaded from (only read).
        removed: block indices to drop, in original numbering (a certificate's ``layers``).
        out_path: the file to write (e.g. ``OUT/model.gguf``); an existing file there is replaced.
        replace: tensors to write from Hugging Face weights instead of copying them (the healed layers):
            ``{HF parameter name: torch tensor or array}``, names as in the model transformers loads from
            this GGUF **in original layer numbering** (the same numbering as ``removed``; a healing record's
            ``tensors``; :func:`slim_model_tensors` reads them from the slim model). Each is put in llama.cpp's
            layout and re-quantized to its source tensor's GGML type, or written as F16 where ``gguf`` cannot
            write that type. A value that looks like another block's tensor under the slim numbering is refused.
        replace_type: write the replaced matrices as this GGML type instead of each one's source type
            (``"Q8_0"``, ``"F16"``, any type ``gguf.quants`` writes); 1-D tensors keep their type. Re-quantizing
            to a 4-bit source type rounds most of what healing changed back to the source's values (the
            record's ``change_kept``; measured on SmolLM2 Q4_1: 6 % of the change and 15 % of the held-out
            KL gain survive Q4_1, all of both survive Q8_0).

    Returns:
        :class:`GgufExport` with the written path and what changed (``healed`` with ``replace``).

    Raises:
        ExportError: the source's blocks do not match its ``block_count``, the indices are not blocks of
            the file, the removal cannot be expressed in GGUF for this architecture, a replacement does not
            map onto a kept tensor of the file (or is for an architecture whose tensor layout skipit cannot
            invert), or the written file does not read back as expected.
        BackendUnavailableError: the ``gguf`` package is not installed.
    """
    gguf = _gguf()
    source, out_path = Path(source_gguf), Path(out_path)
    if not source.is_file():
        raise ExportError(f"{source} does not exist; pass the .gguf file the model was loaded from")
    if out_path.resolve() == source.resolve():
        raise ExportError(f"refusing to overwrite the source GGUF {source}; choose another output path")
    try:
        reader = gguf.GGUFReader(source)
    except (ValueError, OSError) as exc:
        raise ExportError(f"{source} is not a readable GGUF file ({exc}); re-download or re-convert it") from None
    if reader.endianess != gguf.GGUFEndian.LITTLE:
        raise ExportError(f"{source} is a big-endian GGUF; skipit writes little-endian GGUFs only and would have to "
                          "byte-swap its tensors. Use a little-endian conversion of the model")
    plan = _plan(reader, source, removed, gguf)
    replaced, healed = (plan_replacements(reader, plan, source, replace, replace_type, gguf) if replace
                        else ({}, None))
    for key in plan.dropped_empty:
        log.warning("%s: metadata field %s is an empty array, which gguf's writer cannot write; it is left out",
                    source.name, key)

    with atomic_file(out_path) as tmp:
        _write(reader, plan, replaced, tmp, gguf)
        _check_written(reader, plan, replaced, tmp, gguf)
    result = GgufExport(
        path=out_path, architecture=plan.arch, block_count_before=plan.n_blocks, block_count_after=len(plan.kept),
        removed=tuple(i for i in range(plan.n_blocks) if i not in plan.kept), tensors=len(plan.renamed),
        size_bytes=out_path.stat().st_size,
        source_size_bytes=source.stat().st_size,
        sliced_keys=tuple(k for k in plan.changed if k != f"{plan.arch}.block_count"), healed=healed,
    )
    log.info("GGUF: dropped blocks %s of %d from %s → %s (%.1f MB → %.1f MB)", list(result.removed), plan.n_blocks,
             source.name, out_path, result.source_size_bytes / 1e6, result.size_bytes / 1e6)
    if healed:
        log.info("GGUF: %d tensors of blocks %s written from the given weights as %s (largest re-quantization "
                 "error %.3g; %.0f%% of their change from the source kept)", healed["tensors"], healed["blocks"],
                 healed["written_types"], healed["requant_error"]["max_abs"], 100 * (healed["change_kept"] or 0))
        for name, why in healed["f16_fallback"].items():
            log.warning("GGUF: %s written as F16: %s", name, why)
        if healed["change_kept"] is not None and healed["change_kept"] < 0.5:
            log.warning("GGUF: re-quantizing to %s keeps only %.0f%% of the trained tensors' change from the source: "
                        "model.gguf carries little of the healing (model/ has all of it); a finer type for the "
                        "trained tensors (replace_type='Q8_0') keeps it", ", ".join(healed["written_types"]),
                        100 * healed["change_kept"])
    return result


def _write(reader: Any, plan: _Plan, replaced: dict[str, Replacement], path: Path, gguf: Any) -> None:
    vt = gguf.GGUFValueType
    writer = gguf.GGUFWriter(path, plan.arch)  # writes general.architecture itself
    alignment = _scalar(reader, "general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in plan.dropped_empty:
            continue
        value = plan.changed.get(key, None)
        if value is None:
            value = _field_value(field, gguf)
        sub_type = field.types[-1] if field.types[0] == vt.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
    for t in reader.tensors:
        r = replaced.get(t.name)
        if r is not None:
            writer.add_tensor(plan.renamed[t.name], r.data, raw_shape=r.data.shape, raw_dtype=r.qtype)
        elif t.name in plan.renamed:
            writer.add_tensor(plan.renamed[t.name], t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _check_written(reader: Any, plan: _Plan, replaced: dict[str, Replacement], path: Path, gguf: Any) -> None:
    """Read ``path`` back: metadata as planned, every kept tensor byte-identical and of the same type (a
    replaced one: the planned bytes and type)."""
    import numpy as np

    out = gguf.GGUFReader(path)
    problems: list[str] = []
    if len(out.tensors) != len(plan.renamed):
        problems.append(f"{len(out.tensors)} tensors instead of {len(plan.renamed)}")
    written = {t.name: t for t in out.tensors}
    for t in reader.tensors:
        name = plan.renamed.get(t.name)
        if name is None:
            continue
        w = written.get(name)
        r = replaced.get(t.name)
        qtype, data, what = (t.tensor_type, t.data, f"source {t.name}") if r is None else (r.qtype, r.data, f"the new {t.name}")
        if w is None:
            problems.append(f"tensor {name} (from {t.name}) is missing")
        elif w.tensor_type != qtype or list(w.shape) != list(t.shape):
            problems.append(f"tensor {name} is {w.tensor_type.name}{list(w.shape)}, "
                            f"{what} {qtype.name}{list(t.shape)}")
        elif not np.array_equal(np.asarray(w.data).view(np.uint8).ravel(), np.asarray(data).view(np.uint8).ravel()):
            problems.append(f"tensor {name} differs in its bytes from {what}")
        if len(problems) > 5:
            break
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in plan.dropped_empty:
            continue
        got = out.fields.get(key)
        if got is None:
            problems.append(f"metadata field {key} is missing")
        elif key in plan.changed:
            if _field_value(got, gguf) != plan.changed[key]:
                problems.append(f"metadata field {key} is {got.contents()}, expected {plan.changed[key]}")
        elif _field_bytes(got) != _field_bytes(field):
            problems.append(f"metadata field {key} differs from the source")
    if problems:
        raise ExportError(f"the written GGUF does not read back as planned: {'; '.join(problems[:6])}. "
                          "This is a bug in skipit's GGUF exporter: please report it with the source file's architecture")


def gguf_block_count(path: str | os.PathLike) -> int:
    """``<arch>.block_count`` of a GGUF file (read from its header only)."""
    from skipit.compressor.gguf_meta import gguf_header_fields

    arch = gguf_header_fields(path, ["general.architecture"]).get("general.architecture")
    n = gguf_header_fields(path, [f"{arch}.block_count"]).get(f"{arch}.block_count") if arch else None
    if n is None:
        raise ExportError(f"{path} has no general.architecture / <arch>.block_count field; is it a model GGUF?")
    return int(n)


__all__ = ["GgufExport", "export_gguf", "gguf_block_count", "slim_model_tensors"]
