"""TensorRT optimization profiles over a decoder graph, decided without a GPU.

:func:`parse_profiles` reads the CLI form ``prefill=1x1..1x2048,decode=1x1..4x1`` (BATCHxSEQ ranges,
optionally ``min..opt..max``) into validated :class:`ProfileSpec` objects; :func:`shape_ranges` turns those
into ``(min, opt, max)`` shapes for every input of a graph, and :func:`polygraphy_profiles` into Polygraphy
``Profile`` objects for the engine build.

How the KV cache meets TensorRT's profiles
-----------------------------------------
The merged decoder graph takes ``past_key_values.{i}.key/value`` of shape [batch, kv_heads, past, head_dim]
and an ``attention_mask`` of shape [batch, past + seq]. TensorRT profiles need every dimension ≥ 1, so a
*prefill* (no cache yet) cannot pass ``past = 0``. Instead the caller passes a **dummy cache of length 1**
(zeros) and prepends a ``0`` column to ``attention_mask`` so the dummy slot is masked out; ``position_ids``
are given explicitly (0 … seq-1), so the results equal those of an empty cache
(:func:`skipit.runtime.tensorrt.with_dummy_past`). The ``present.*`` outputs then hold the dummy slot at
index 0 of the past axis: either keep it (and the mask's leading 0) for every following decode step, or drop
``present[:, :, 1:]`` together with the mask's first column. So:

* ``prefill*`` profiles: seq from the spec, past fixed at 1 (the dummy), total = seq + 1;
* ``decode*`` profiles: seq from the spec (1 for plain decoding, >1 for speculative verification),
  past 1 … ``max_context + 1 - seq_min`` (``max_context`` real tokens plus the dummy slot), total = past + seq.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from skipit.errors import ExportError, InvalidOptionError
from skipit.exporters.onnx.convention import KV_NAME_RE
from skipit.exporters.tensorrt.ops import load_graph_only

if TYPE_CHECKING:  # pragma: no cover
    import onnx

PROFILE_EXAMPLE = "prefill=1x1..1x2048,decode=1x1..4x1"


class Shape(NamedTuple):
    """One BATCHxSEQ point of a profile."""

    batch: int
    seq: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.seq}"


class ShapeRange(NamedTuple):
    """TensorRT's ``(min, opt, max)`` for one input of one profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


_KINDS = ("prefill", "decode")


@dataclass(frozen=True)
class ProfileSpec:
    """An optimization profile over batch size and new-token count, e.g. ``prefill=1x1..1x2048``.

    ``opt`` (the shape TensorRT tunes kernels for) defaults to the midpoint of each axis. The kind of
    profile comes from the name: ``prefill…`` (empty cache, fed as one masked dummy slot) or ``decode…``
    (a cache of up to ``max_context`` tokens); see the module docstring.
    """

    name: str
    min: Shape
    max: Shape
    opt: Shape | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "min", Shape(*self.min))
        object.__setattr__(self, "max", Shape(*self.max))
        if self.opt is None:
            object.__setattr__(self, "opt", Shape((self.min.batch + self.max.batch) // 2,
                                                  (self.min.seq + self.max.seq) // 2))
        else:
            object.__setattr__(self, "opt", Shape(*self.opt))
        self._validate()

    @property
    def opt_shape(self) -> Shape:
        """``opt``, which ``__post_init__`` always sets (to the midpoint when not given)."""
        assert self.opt is not None
        return self.opt

    @property
    def kind(self) -> str:
        """``"prefill"`` or ``"decode"``, from the name."""
        return next(k for k in _KINDS if self.name.startswith(k))

    def __str__(self) -> str:
        return f"{self.name}={self.min}..{self.opt}..{self.max}"

    def _validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][\w-]*", self.name) or not self.name.startswith(_KINDS):
            raise InvalidOptionError(
                f"profile name {self.name!r} must start with 'prefill' or 'decode' (it decides how the KV "
                f"cache is sized: prefill = empty cache, decode = up to --max-context tokens); "
                f"write e.g. {PROFILE_EXAMPLE}")
        for point in (self.min, self.opt_shape, self.max):
            for axis, value in zip(("batch", "sequence"), point):
                if value < 1:
                    raise InvalidOptionError(
                        f"profile {self.name!r}: {axis} {value} in {point} — TensorRT profiles need every "
                        f"dimension ≥ 1 (write {self.name}=1x1..{max(self.max.batch, 1)}x{max(self.max.seq, 1)}); "
                        f"an empty KV cache is fed as one masked dummy slot, see with_dummy_past()")
        for i in range(2):
            lo, mid, hi = self.min[i], self.opt_shape[i], self.max[i]
            if lo > hi:
                raise InvalidOptionError(
                    f"profile {self.name!r}: min {self.min} is above max {self.max}; write the smaller "
                    f"shape first: {self.name}={_pointwise(min, self.min, self.max)}.."
                    f"{_pointwise(max, self.min, self.max)}")
            if not lo <= mid <= hi:
                raise InvalidOptionError(
                    f"profile {self.name!r}: opt {self.opt} lies outside {self.min}..{self.max}; "
                    f"write min..opt..max with min ≤ opt ≤ max, or leave opt out: {self.name}={self.min}..{self.max}")


def _pointwise(fn: Any, a: Shape, b: Shape) -> Shape:
    return Shape(fn(a.batch, b.batch), fn(a.seq, b.seq))


def _parse_shape(text: str, name: str) -> Shape:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise InvalidOptionError(
            f"profile {name!r}: {text.strip()!r} is not BATCHxSEQ; write e.g. 1x2048 "
            f"(full form: {PROFILE_EXAMPLE})")
    return Shape(int(match[1]), int(match[2]))


def parse_profile(text: str) -> ProfileSpec:
    """Parse one ``name=BxS..BxS`` (or ``name=BxS..BxS..BxS`` min..opt..max, or a fixed ``name=BxS``)."""
    name, sep, shapes = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise InvalidOptionError(f"profile {text.strip()!r} has no name=; write e.g. {PROFILE_EXAMPLE}")
    points = [_parse_shape(part, name) for part in shapes.split("..")]
    if len(points) == 1:
        return ProfileSpec(name, points[0], points[0], points[0])
    if len(points) == 2:
        return ProfileSpec(name, points[0], points[1])
    if len(points) == 3:
        return ProfileSpec(name, points[0], points[2], opt=points[1])
    raise InvalidOptionError(
        f"profile {name!r}: {shapes.strip()!r} has {len(points)} shapes; give min..max or min..opt..max, "
        f"e.g. {name}=1x1..1x128..1x2048")


def parse_profiles(text: str | Sequence[str]) -> tuple[ProfileSpec, ...]:
    """Parse the ``--profiles`` option: comma-separated profiles (or a list of them), unique names."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    parts = [p for p in parts if p.strip()]
    if not parts:
        raise InvalidOptionError(f"no TensorRT profiles given; write e.g. --profiles {PROFILE_EXAMPLE}")
    specs = tuple(parse_profile(p) for p in parts)
    _check_unique(specs)
    return specs


def _check_unique(specs: Sequence[ProfileSpec]) -> None:
    dupes = sorted(n for n, c in Counter(s.name for s in specs).items() if c > 1)
    if dupes:
        raise InvalidOptionError(f"profile name(s) {', '.join(dupes)} given twice; each profile needs its own "
                                 f"name, e.g. prefill=…,decode=…")


def as_profiles(profiles: str | Sequence[str | ProfileSpec]) -> tuple[ProfileSpec, ...]:
    """Accept the CLI string, a list of strings, or ready :class:`ProfileSpec` objects."""
    if isinstance(profiles, str):
        return parse_profiles(profiles)
    specs = tuple(p if isinstance(p, ProfileSpec) else parse_profile(p) for p in profiles)
    if not specs:
        raise InvalidOptionError(f"no TensorRT profiles given; write e.g. --profiles {PROFILE_EXAMPLE}")
    _check_unique(specs)
    return specs


# --------------------------------------------------------------------------------------------------
# Graph inputs → shape ranges
# --------------------------------------------------------------------------------------------------
# The role of each axis of the inputs skipit's exporters write, by input name and rank. None marks an
# axis whose size is fixed in the graph (KV heads, head_dim, hidden size, the 3 of M-RoPE positions).
_AXIS_ROLES: dict[str, dict[int, tuple[str | None, ...]]] = {
    "input_ids": {2: ("batch", "seq")},
    "inputs_embeds": {3: ("batch", "seq", None)},
    "attention_mask": {2: ("batch", "total")},
    # 3-D position_ids are Qwen2-VL's M-RoPE positions [3, batch, seq], computed outside the graph.
    "position_ids": {2: ("batch", "seq"), 3: (None, "batch", "seq")},
    "cache_position": {1: ("seq",)},
}
_KV_ROLES: dict[int, tuple[str | None, ...]] = {4: ("batch", None, "past", None)}

# Symbolic dimension names (optimum, torch.onnx dynamic_axes, skipit) and the role they stand for.
_DIM_ALIASES: dict[str, str] = {
    **dict.fromkeys(["batch", "batch_size"], "batch"),
    **dict.fromkeys(["sequence", "sequence_length", "seq", "seq_len", "seq_length", "num_tokens"], "seq"),
    **dict.fromkeys(["past_sequence", "past_sequence_length", "past_seq_len", "past_length", "past_len",
                     "past"], "past"),
    **dict.fromkeys(["total", "total_sequence_length", "total_seq_len", "total_length", "attention_length",
                     "past_sequence_length+sequence_length", "past_sequence+sequence",
                     "past_sequence_length+1"], "total"),
}


def _roles_for(name: str, rank: int) -> tuple[str | None, ...] | None:
    table = _KV_ROLES if KV_NAME_RE.fullmatch(name) else _AXIS_ROLES.get(name, {})
    return table.get(rank)


def role_ranges(spec: ProfileSpec, max_context: int) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each named dimension (batch, seq, past, total) for one profile."""
    if max_context < 1:
        raise InvalidOptionError(f"max_context must be ≥ 1, got {max_context}")
    if spec.max.seq > max_context:
        raise InvalidOptionError(
            f"profile {spec.name!r} goes up to {spec.max.seq} tokens but max_context is {max_context}; "
            f"lower the profile's sequence maximum or raise --max-context")
    batch = (spec.min.batch, spec.opt_shape.batch, spec.max.batch)
    seq = (spec.min.seq, spec.opt_shape.seq, spec.max.seq)
    if spec.kind == "prefill":
        past = (1, 1, 1)  # the masked dummy slot, see with_dummy_past()
    else:
        past_max = max_context + 1 - spec.min.seq  # max_context real tokens plus the dummy slot
        past = (1, min(past_max, max(1, max_context // 2)), past_max)
    total = (past[0] + seq[0], past[1] + seq[1], past[2] + seq[2])
    return {"batch": batch, "seq": seq, "past": past, "total": total}


def graph_inputs(onnx_path: str | Path) -> list[onnx.ValueInfoProto]:
    """The real inputs of a graph (initializers listed as inputs by old exporters left out), weights not loaded."""
    model = load_graph_only(onnx_path)
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def shape_ranges(
    onnx_path: str | Path,
    profiles: str | Sequence[str | ProfileSpec],
    max_context: int,
) -> dict[str, dict[str, ShapeRange]]:
    """For each profile, each graph input name → (min, opt, max) shapes for ``profile.set_shape``.

    Dimensions are recognised by their symbolic name (batch, sequence, past_sequence, total …) and
    otherwise by their position in skipit's input layout; fixed dimensions (KV heads, head_dim, hidden)
    are taken from the graph. Raises :class:`ExportError` for an input whose layout is unknown and
    :class:`InvalidOptionError` when a profile asks for a size the graph fixes otherwise.
    """
    specs = as_profiles(profiles)
    inputs = graph_inputs(onnx_path)
    out: dict[str, dict[str, ShapeRange]] = {}
    for spec in specs:
        roles = role_ranges(spec, max_context)
        out[spec.name] = {i.name: _input_range(i, roles, spec) for i in inputs}
    return out


def _input_range(value: onnx.ValueInfoProto, roles: dict[str, tuple[int, int, int]],
                 spec: ProfileSpec) -> ShapeRange:
    dims = list(value.type.tensor_type.shape.dim)
    positional = _roles_for(value.name, len(dims))
    lo, mid, hi = [], [], []
    for axis, dim in enumerate(dims):
        role = _DIM_ALIASES.get(dim.dim_param.replace(" ", "").lower()) if dim.dim_param else None
        if role is None and positional is not None:
            role = positional[axis]
        if dim.HasField("dim_value"):
            fixed = dim.dim_value
            if role is not None and roles[role] != (fixed,) * 3:
                raise InvalidOptionError(
                    f"{value.name} has its {role} axis fixed at {fixed} in the graph but profile {spec.name!r} "
                    f"asks for {roles[role][0]}..{roles[role][2]}: re-export with that axis dynamic, or use "
                    f"{fixed} in the profile")
            rng: tuple[int, int, int] = (fixed, fixed, fixed)
        elif role is None:
            raise ExportError(
                f"input {value.name!r} axis {axis} is dynamic ({dim.dim_param or 'unnamed'}) but skipit does "
                f"not know what it measures; known inputs: {', '.join(_AXIS_ROLES)}, past_key_values.N.key/value; "
                f"known dimension names: batch, sequence, past_sequence, total. Re-export with those names "
                f"or with that axis fixed")
        else:
            rng = roles[role]
        lo.append(rng[0])
        mid.append(rng[1])
        hi.append(rng[2])
    return ShapeRange(tuple(lo), tuple(mid), tuple(hi))


def default_max_context(onnx_path: str | Path) -> int:
    """``max_position_embeddings`` of the model's config.json beside the graph (``DIR/onnx/model.onnx`` →
    ``DIR/config.json``, or in the same folder)."""
    path = Path(onnx_path).resolve()
    for folder in (path.parent, path.parent.parent):
        config = folder / "config.json"
        if config.is_file():
            data = json.loads(config.read_text())
            for section in (data.get("text_config") or {}, data):
                if isinstance(section.get("max_position_embeddings"), int):
                    return section["max_position_embeddings"]
    raise InvalidOptionError(
        f"cannot tell the longest context for {path.name}: no config.json with max_position_embeddings next "
        f"to it or one folder up; pass max_context= (CLI: --max-context N)")




def polygraphy_profiles(ranges: dict[str, dict[str, ShapeRange]]) -> list[Any]:
    """One Polygraphy ``Profile`` per profile of :func:`shape_ranges` (no TensorRT needed to build them)."""
    from polygraphy.backend.trt import Profile

    profiles = []
    for inputs in ranges.values():
        profile = Profile()
        for name, (lo, mid, hi) in inputs.items():
            profile.add(name, lo, mid, hi)
        profiles.append(profile)
    return profiles
