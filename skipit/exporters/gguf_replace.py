"""Healed weights into a slim GGUF: Hugging Face tensors (original layer numbering) mapped to the GGUF's tensor
names, put through llama.cpp's layout transforms and re-quantized to the source's type (or a given one), with a
record of how much of the change survived; and :func:`slim_model_tensors`, which reads them from the slim model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from skipit.errors import ExportError
from skipit.exporters.gguf_tensors import GGUF_BLOCK, arch_tensors, dequantize, gguf_name_map, hf_block, requantize, writable_type

if TYPE_CHECKING:
    from skipit.exporters.gguf import _Plan as Plan


@dataclass(frozen=True)
class Replacement:
    """One GGUF tensor's new contents: the HF weight it came from, the data and GGML type written, and why the
    type is not the source's (None when it is)."""

    hf_name: str
    data: Any  # numpy array handed to GGUFWriter.add_tensor
    qtype: Any  # the GGML type written
    fallback: str | None  # why qtype is not the source's type


_NUMBERING = ("keys are Hugging Face parameter names in ORIGINAL layer numbering, like `removed` (the names a "
              "healing record lists); read them from the slim model with slim_model_tensors(slim_model, removed, names)")


def _as_float32(value: Any, hf_name: str) -> Any:
    import numpy as np

    if hasattr(value, "detach"):  # a torch tensor (any dtype, any device)
        import torch

        value = value.detach().to(device="cpu", dtype=torch.float32).numpy()
    arr = np.asarray(value, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ExportError(f"replace[{hf_name!r}] holds NaN or infinite values; it cannot be written")
    return arr


def plan_replacements(reader: Any, plan: Plan, source: Path, replace: Mapping[str, Any], replace_type: str | None,
                       gguf: Any) -> tuple[dict[str, Replacement], dict[str, Any]]:
    """Map, transform and re-quantize ``replace``; return {source tensor name: replacement} and the record."""
    import numpy as np

    wanted = writable_type(replace_type, gguf) if replace_type is not None else None
    transforms = arch_tensors(plan.arch, reader.fields, source.name)
    lookup = gguf_name_map(plan.arch, plan.n_blocks, gguf)
    tensors = {t.name: t for t in reader.tensors}
    kept, dropped = plan.kept, set(range(plan.n_blocks)) - set(plan.kept)
    out: dict[str, Replacement] = {}
    err_max = err_sum = 0.0
    n_values = 0
    dot = change_sq = 0.0
    largest = (0.0, "")
    for hf_name in sorted(replace):
        gname = lookup(hf_name)
        if gname is None or gname not in tensors:
            found = f" (gguf's name map gives {gname}, which the file does not hold)" if gname else ""
            raise ExportError(f"replace[{hf_name!r}]: no tensor of {source.name} corresponds to it{found}; {_NUMBERING}")
        if gname in out:
            raise ExportError(f"replace[{hf_name!r}] and replace[{out[gname].hf_name!r}] both name {gname}")
        m = GGUF_BLOCK.fullmatch(gname)
        block = int(m.group(1)) if m else None
        if block in dropped:
            raise ExportError(f"replace[{hf_name!r}] is for block {block}, which is being removed; {_NUMBERING}")
        t = tensors[gname]
        shape = tuple(int(x) for x in reversed(t.shape))  # numpy order, as dequantize gives it
        hf_values = _as_float32(replace[hf_name], hf_name)
        if hf_values.shape != shape:
            raise ExportError(f"replace[{hf_name!r}] has shape {list(hf_values.shape)}, but {gname} in {source.name} "
                              f"holds {list(shape)}; {_NUMBERING}")
        values = np.ascontiguousarray(transforms.to_gguf(gname, hf_values, block), dtype=np.float32)
        before = dequantize(t.data, t.tensor_type, gguf)
        slipped = kept[block] if m is not None and block is not None and block < len(kept) else None
        other = tensors.get(f"blk.{slipped}.{m.group(2)}") if m is not None and slipped is not None else None
        if other is not None and other.name != gname and values.ndim >= 2 and list(other.shape) == list(t.shape):
            # the likely slip: a slim-model name (slim block j is original block kept[j]) passed as if original.
            # Training moves a tensor by a few percent; another block's tensor is about as far as its own norm
            if float(np.square(values - dequantize(other.data, other.tensor_type, gguf)).sum()) < \
                    float(np.square(values - before).sum()) / 16:
                raise ExportError(
                    f"replace[{hf_name!r}] is far closer to {other.name} of {source.name} than to {gname}: it looks like the "
                    f"slim model's layer {block} (original block {slipped}) passed under its slim name; {_NUMBERING}")
        target = t.tensor_type
        if wanted is not None and values.ndim >= 2:  # 1-D tensors (norms, biases) keep their type, F32 as a rule
            block_size = gguf.GGML_QUANT_SIZES[wanted][0]
            if values.shape[-1] % block_size:
                raise ExportError(f"{gname} has rows of {values.shape[-1]} values, which {wanted.name} (blocks of "
                                  f"{block_size}) cannot hold; choose another replace_type")
            target = wanted
        data, qtype, why = requantize(values, target, gguf)
        written = dequantize(data, qtype, gguf)
        err = np.abs(written - values)
        err_max, err_sum, n_values = max(err_max, float(err.max(initial=0.0))), err_sum + float(err.sum()), n_values + err.size
        delta = (values - before).astype(np.float64)
        dot += float(((written - before).astype(np.float64) * delta).sum())
        delta_sq = float(np.square(delta).sum())
        change_sq += delta_sq
        rel = (delta_sq / max(float(np.square(before.astype(np.float64)).sum()), 1e-30)) ** 0.5
        if rel >= largest[0]:
            largest = (rel, plan.renamed[gname])
        out[gname] = Replacement(hf_name, data, qtype, why)

    types: dict[str, int] = {}
    for r in out.values():
        types[r.qtype.name] = types.get(r.qtype.name, 0) + 1
    blocks = {int(m.group(1)) for m in map(GGUF_BLOCK.fullmatch, out) if m}
    record = {
        "type": wanted.name if wanted is not None else "source",
        "tensors": len(out),
        "blocks": sorted(blocks),  # original numbering
        "written_types": dict(sorted(types.items())),
        "f16_fallback": {plan.renamed[g]: r.fallback for g, r in sorted(out.items()) if r.fallback},  # output names
        "requant_error": {"max_abs": err_max, "mean_abs": err_sum / max(n_values, 1)},
        "largest_change": {"relative": largest[0], "tensor": largest[1]},
        "change_kept": None if change_sq == 0 else dot / change_sq,
    }
    return out, record


def slim_model_tensors(slim_model: Any, removed: Sequence[int], names: Sequence[str]) -> dict[str, Any]:
    """``{name: tensor}`` for :func:`export_gguf`'s ``replace``, read from the model after the removal.

    ``names`` are HF parameter names in original numbering (a healing record's ``tensors``);
    ``slim_model`` is the model after ``remove_layers_(…, removed)``, whose layers are renumbered
    (original layer ``i`` is at ``i - (removed layers below i)``). The tensors are returned as they are
    (no copy); keys stay in original numbering.
    """
    import bisect

    params = dict(slim_model.named_parameters())
    gone = sorted({int(i) for i in removed})
    out = {}
    for name in names:
        old = hf_block(name)
        slim = name
        if old is not None:
            if old in gone:
                raise ExportError(f"{name} is a parameter of removed layer {old}; it is not in the slim model")
            head, _, rest = name.rpartition(f"layers.{old}.")
            slim = f"{head}layers.{old - bisect.bisect_left(gone, old)}.{rest}"
        if slim not in params:
            raise ExportError(f"the slim model has no parameter {slim} (for {name}); pass the model after remove_layers_ "
                              "and the names in original numbering")
        out[name] = params[slim]
    return out
