"""TensorRT engines from skipit's ONNX graphs (TensorRT 10 Python API).

Everything that can be decided without a GPU is plain Python here and runs on any machine:

* :func:`parse_profiles` reads the CLI form ``prefill=1x1..1x2048,decode=1x1..4x1`` (BATCHxSEQ ranges,
  optionally ``min..opt..max``) into validated :class:`ProfileSpec` objects;
* :func:`shape_ranges` turns those into TensorRT ``(min, opt, max)`` shapes for every input of a graph;
* :func:`check_trt_compatibility` lists the graph's operators against TensorRT's ONNX support table;
* :class:`EngineSidecar` records what an engine was built for, and :func:`check_engine_compatible`
  refuses an engine built for another GPU architecture or TensorRT version.

Only :func:`build_engine`, :func:`current_env` and :class:`TrtRunner` need ``tensorrt`` and a CUDA GPU;
they import it lazily and raise :class:`~skipit.errors.BackendUnavailableError` when it is missing.

How the KV cache meets TensorRT's profiles
-----------------------------------------
The merged decoder graph takes ``past_key_values.{i}.key/value`` of shape [batch, kv_heads, past, head_dim]
and an ``attention_mask`` of shape [batch, past + seq]. TensorRT profiles need every dimension ≥ 1, so a
*prefill* (no cache yet) cannot pass ``past = 0``. Instead the caller passes a **dummy cache of length 1**
(zeros) and prepends a ``0`` column to ``attention_mask`` so the dummy slot is masked out; ``position_ids``
are given explicitly (0 … seq-1), so the results equal those of an empty cache. :func:`with_dummy_past`
does this rewrite. The ``present.*`` outputs then hold the dummy slot at index 0 of the past axis: either
keep it (and the mask's leading 0) for every following decode step, or drop ``present[:, :, 1:]`` together
with the mask's first column. So:

* ``prefill*`` profiles: seq from the spec, past fixed at 1 (the dummy), total = seq + 1;
* ``decode*`` profiles: seq from the spec (1 for plain decoding, >1 for speculative verification),
  past 1 … ``max_context + 1 - seq_min`` (``max_context`` real tokens plus the dummy slot), total = past + seq.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from skipit.errors import (
    BackendUnavailableError,
    EngineIncompatibleError,
    ExportError,
    InvalidOptionError,
)

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import onnx
    import torch

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "bf16", "fp32")
SIDECAR_FORMAT = "skipit-trt-engine/1"
PROFILE_EXAMPLE = "prefill=1x1..1x2048,decode=1x1..4x1"
INSTALL_HINT = (
    "TensorRT engines need an NVIDIA GPU with CUDA: on such a machine run `pip install skipit[gpu]` "
    "(tensorrt>=10 and onnxruntime-gpu) with a CUDA build of torch. The ONNX graphs are portable: copy "
    "the onnx/ directory there and build the engines with `skipit export OUT/onnx OUT/engines --trt`."
)

# --------------------------------------------------------------------------------------------------
# TensorRT's ONNX operator support, as data.
# Source: TensorRT's "ONNX operator support" matrix (onnx-tensorrt docs/operators.md, TensorRT 10.15:
# "supports operators in the inclusive range of opset 9 to opset 24"; TensorRT 10.0 covered opsets 9–20).
# Only operators marked "Y" there are listed; anything else in the default ONNX domain is unsupported.
# --------------------------------------------------------------------------------------------------
TRT_ONNX_OPS: frozenset[str] = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax
Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish
Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan
Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile TopK Transpose
Trilu Unsqueeze Upsample Where Xor
""".split())

# Operators the table lists but that only recent TensorRT 10 releases parse (onnx-tensorrt changelog).
TRT_OPS_SINCE: dict[str, str] = {
    "Attention": "10.14",
    "RMSNormalization": "10.15",
    "RotaryEmbedding": "10.15",
    "TensorScatter": "10.15",
}
TRT_MIN_OPSET, TRT_MAX_OPSET, TRT_10_0_MAX_OPSET = 9, 24, 20

# Non-default domains: why TensorRT cannot parse them and what to do instead.
_FOREIGN_DOMAINS: dict[str, str] = {
    "com.microsoft": "an ONNX Runtime contrib op (written by optimum --optimize O1–O4 or onnxruntime's "
                     "transformer optimizer); TensorRT cannot parse it: export without --optimize",
    "ai.onnx.ml": "a classical-ML op, which TensorRT does not support",
    "ai.onnx.training": "a training op, which TensorRT does not support",
    "ai.onnx.preview.training": "a training op, which TensorRT does not support",
}
_PLUGIN_DOMAINS = ("trt", "trt.plugins")


# --------------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------------
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
        for point in (self.min, self.opt, self.max):
            for axis, value in zip(("batch", "sequence"), point):
                if value < 1:
                    raise InvalidOptionError(
                        f"profile {self.name!r}: {axis} {value} in {point} — TensorRT profiles need every "
                        f"dimension ≥ 1 (write {self.name}=1x1..{max(self.max.batch, 1)}x{max(self.max.seq, 1)}); "
                        f"an empty KV cache is fed as one masked dummy slot, see with_dummy_past()")
        for axis in range(2):
            lo, mid, hi = self.min[axis], self.opt[axis], self.max[axis]
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
_KV_INPUT = re.compile(r"past_key_values\.\d+\.(key|value)")
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
    table = _KV_ROLES if _KV_INPUT.fullmatch(name) else _AXIS_ROLES.get(name, {})
    return table.get(rank)


def role_ranges(spec: ProfileSpec, max_context: int) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each named dimension (batch, seq, past, total) for one profile."""
    if max_context < 1:
        raise InvalidOptionError(f"max_context must be ≥ 1, got {max_context}")
    if spec.max.seq > max_context:
        raise InvalidOptionError(
            f"profile {spec.name!r} goes up to {spec.max.seq} tokens but max_context is {max_context}; "
            f"lower the profile's sequence maximum or raise --max-context")
    batch = (spec.min.batch, spec.opt.batch, spec.max.batch)
    seq = (spec.min.seq, spec.opt.seq, spec.max.seq)
    if spec.kind == "prefill":
        past = (1, 1, 1)  # the masked dummy slot, see with_dummy_past()
    else:
        past_max = max_context + 1 - spec.min.seq  # max_context real tokens plus the dummy slot
        past = (1, min(past_max, max(1, max_context // 2)), past_max)
    total = (past[0] + seq[0], past[1] + seq[1], past[2] + seq[2])
    return {"batch": batch, "seq": seq, "past": past, "total": total}


def graph_inputs(onnx_path: str | Path) -> list[onnx.ValueInfoProto]:
    """The real inputs of a graph (initializers listed as inputs by old exporters left out), weights not loaded."""
    model = _load_graph_only(onnx_path)
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


def with_dummy_past(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rewrite a feed with an empty KV cache (past = 0) into the one-dummy-slot form TensorRT accepts.

    Each ``past_key_values.*`` becomes zeros of past length 1 and ``attention_mask`` gets a leading 0
    column, so the dummy is masked out; ``position_ids`` must be given explicitly (they are unchanged).
    A feed whose cache is not empty is returned unchanged (as a new dict).
    """
    import numpy as np

    out = dict(feed)
    kv = [n for n in feed if _KV_INPUT.fullmatch(n)]
    empty = [n for n in kv if feed[n].shape[2] == 0]
    if not empty:
        return out
    if len(empty) != len(kv):
        raise InvalidOptionError("some past_key_values are empty and some are not; give all layers the same past")
    for name in kv:
        shape = list(feed[name].shape)
        shape[2] = 1
        out[name] = np.zeros(shape, dtype=feed[name].dtype)
    mask = np.asarray(feed["attention_mask"])
    out["attention_mask"] = np.concatenate([np.zeros((mask.shape[0], 1), mask.dtype), mask], axis=1)
    return out


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


# --------------------------------------------------------------------------------------------------
# Compatibility check
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrtCompatibility:
    """What :func:`check_trt_compatibility` found. Truthy when TensorRT 10 should parse the graph."""

    path: str
    opset: int | None
    op_counts: dict[str, int]
    unsupported: tuple[str, ...]
    problems: tuple[str, ...]
    warnings: tuple[str, ...]
    summary: str | None = None  # Polygraphy's model summary, when polygraphy is installed

    @property
    def ok(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        return self.ok

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}

    def raise_for_problems(self) -> None:
        """Raise :class:`ExportError` listing every problem (no-op when the graph is fine)."""
        if self.problems:
            listed = "\n  - ".join(self.problems)
            raise ExportError(f"{Path(self.path).name} is not TensorRT-compatible:\n  - {listed}")


def check_trt_compatibility(onnx_path: str | Path, opset: int | None = None) -> TrtCompatibility:
    """Check a graph for TensorRT 10 without TensorRT: ONNX checker, opset range, every operator.

    ``opset`` is the default-domain opset the graph was exported with; when given, a graph declaring
    another one is reported (a stale or re-written file). Operators are looked up in
    :data:`TRT_ONNX_OPS`; ops of other domains (``com.microsoft`` contrib ops above all) are reported as
    incompatible, ``trt`` plugin ops as a warning. Local functions and If/Loop/Scan bodies are walked.
    """
    import onnx

    path = Path(onnx_path)
    problems: list[str] = []
    warnings: list[str] = []
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - report any checker failure, never crash the check
        first_line = (str(exc).strip().splitlines() or [repr(exc)])[0]
        problems.append(f"onnx.checker failed: {first_line}")
    model = _load_graph_only(path)
    graph_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    problems += _opset_problems(graph_opset, opset, warnings)
    counts = Counter(_walk_ops(model))
    unsupported = []
    for key in sorted(counts):
        verdict = _op_verdict(key)
        if verdict is None:
            continue
        level, message = verdict
        (problems if level == "problem" else warnings).append(f"{key} ×{counts[key]}: {message}")
        if level == "problem":
            unsupported.append(key)
    problems += _attention_problems(model)
    report = TrtCompatibility(str(path), graph_opset, dict(sorted(counts.items())), tuple(unsupported),
                              tuple(problems), tuple(warnings), _polygraphy_summary(model))
    log.info("TensorRT compatibility of %s: %s", path.name, "ok" if report else "; ".join(problems))
    return report


def _opset_problems(graph_opset: int | None, expected: int | None, warnings: list[str]) -> list[str]:
    if graph_opset is None:
        return ["the graph imports no default-domain opset"]
    problems = []
    if expected is not None and graph_opset != expected:
        problems.append(f"the graph declares opset {graph_opset} but was expected at opset {expected}; "
                        f"re-export it")
    if not TRT_MIN_OPSET <= graph_opset <= TRT_MAX_OPSET:
        problems.append(f"opset {graph_opset} is outside TensorRT 10's range {TRT_MIN_OPSET}–{TRT_MAX_OPSET}; "
                        f"re-export with --opset 18")
    elif graph_opset > TRT_10_0_MAX_OPSET:
        warnings.append(f"opset {graph_opset} needs a recent TensorRT 10 (10.0 parses up to opset "
                        f"{TRT_10_0_MAX_OPSET}, 10.15 up to {TRT_MAX_OPSET}); opset 18 works everywhere")
    return problems


def _walk_ops(model: onnx.ModelProto) -> Iterator[str]:
    """Yield ``Op`` (default domain) or ``domain::Op`` for every node, inside functions and subgraphs too."""
    functions = {(f.domain, f.name): f for f in model.functions}
    seen: set[tuple[str, str]] = set()

    def walk(nodes: Sequence[onnx.NodeProto]) -> Iterator[str]:
        for node in nodes:
            key = (node.domain, node.op_type)
            if key in functions:  # TensorRT inlines local functions: check their bodies instead
                if key not in seen:
                    seen.add(key)
                    yield from walk(functions[key].node)
                continue
            yield node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            for attr in node.attribute:
                for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from walk(graph.node)

    yield from walk(model.graph.node)


def _op_verdict(key: str) -> tuple[str, str] | None:
    """None when TensorRT 10 parses the op; else ("problem" | "warning", why and what to do)."""
    domain, _, op = key.rpartition("::")
    if not domain:
        if op not in TRT_ONNX_OPS:
            return "problem", "not in TensorRT's ONNX operator support table"
        if op in TRT_OPS_SINCE:
            return "warning", f"needs TensorRT ≥ {TRT_OPS_SINCE[op]}"
        return None
    if domain in _PLUGIN_DOMAINS:
        return "warning", "a TensorRT plugin op: the plugin must be registered where the engine is built and run"
    why = _FOREIGN_DOMAINS.get(domain, f"a custom op of domain {domain!r}; TensorRT needs a plugin for it")
    return "problem", why


def _attention_problems(model: onnx.ModelProto) -> list[str]:
    """TensorRT's ``Attention`` takes no KV cache inputs/outputs (torch.onnx writes them at opset ≥ 23)."""
    for node in model.graph.node:
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            if any(node.input[4:6]) or any(node.output[1:]):
                return ["ONNX Attention with past_key/past_value or present outputs: TensorRT's Attention "
                        "supports neither; export at opset 18 (attention as MatMul/Softmax)"]
    return []


def _polygraphy_summary(model: onnx.ModelProto) -> str | None:
    try:
        from polygraphy.backend.onnx.util import str_from_onnx
    except ImportError:
        return None
    try:
        return str_from_onnx(model)
    except Exception as exc:  # noqa: BLE001 - a summary is a nicety, never a failure
        log.debug("polygraphy summary failed: %s", exc)
        return None


@functools.lru_cache(maxsize=8)
def _load_graph_cached(path: str, mtime: float) -> onnx.ModelProto:
    import onnx

    return onnx.load(path, load_external_data=False)


def _load_graph_only(onnx_path: str | Path) -> onnx.ModelProto:
    path = Path(onnx_path)
    if not path.is_file():
        raise ExportError(f"ONNX graph {path} does not exist; export it first (skipit export MODEL OUT/onnx)")
    try:
        return _load_graph_cached(str(path.resolve()), path.stat().st_mtime)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and friends
        raise ExportError(f"cannot read {path} as ONNX ({exc}); re-export it") from exc


# --------------------------------------------------------------------------------------------------
# Engine sidecar: what an engine was built for
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineEnv:
    """The software and GPU an engine is bound to."""

    tensorrt_version: str
    cuda_version: str
    gpu_name: str
    compute_capability: str  # "9.0"


@dataclass(frozen=True)
class EngineSidecar:
    """``<engine>.json``: how an engine was built, read back before it is run."""

    engine: str
    onnx: str
    onnx_sha256: str
    precision: str
    max_context: int
    profiles: tuple[str, ...]
    shapes: dict[str, dict[str, dict[str, list[int]]]]
    env: EngineEnv
    created: str = ""
    skipit_version: str = ""
    format: str = SIDECAR_FORMAT

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineSidecar:
        if data.get("format") != SIDECAR_FORMAT:
            raise ExportError(f"engine sidecar has format {data.get('format')!r}, expected {SIDECAR_FORMAT!r}; "
                              f"rebuild the engine with this skipit")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["env"] = EngineEnv(**data["env"])
        values["profiles"] = tuple(data["profiles"])
        return cls(**values)


def sidecar_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def write_sidecar(engine_path: str | Path, sidecar: EngineSidecar) -> Path:
    path = sidecar_path(engine_path)
    _atomic_write(path, json.dumps(sidecar.as_dict(), indent=2).encode())
    return path


def read_sidecar(engine_path: str | Path) -> EngineSidecar:
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise ExportError(f"{path.name} is missing next to {Path(engine_path).name}; rebuild the engine "
                          f"with skipit export … --trt (it records what GPU and TensorRT the engine needs)")
    try:
        return EngineSidecar.from_dict(json.loads(path.read_text()))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path} is not a valid engine sidecar ({exc}); rebuild the engine") from exc


def check_engine_compatible(sidecar: EngineSidecar, env: EngineEnv) -> None:
    """Raise :class:`EngineIncompatibleError` unless the engine can run here.

    TensorRT engines (built without version/hardware compatibility) run only with the TensorRT
    version and on the GPU architecture (compute capability) they were built with. Another GPU model of
    the same architecture, or another CUDA version, runs but may be slower: that is only logged.
    """
    built, here = sidecar.env, env
    reasons = []
    if built.tensorrt_version != here.tensorrt_version:
        reasons.append(f"TensorRT {built.tensorrt_version} (here: {here.tensorrt_version})")
    if built.compute_capability != here.compute_capability:
        reasons.append(f"compute capability {built.compute_capability}, {built.gpu_name} "
                       f"(here: {here.compute_capability}, {here.gpu_name})")
    if reasons:
        raise EngineIncompatibleError(
            f"engine {sidecar.engine} was built for {' and '.join(reasons)}; engines do not move between "
            f"TensorRT versions or GPU architectures. Rebuild it on this machine from the portable ONNX graph: "
            f"skipit export OUT/onnx OUT/engines --trt --profiles {','.join(sidecar.profiles)} "
            f"--precision {sidecar.precision} --max-context {sidecar.max_context}")
    if built.gpu_name != here.gpu_name:
        log.warning("engine %s was tuned on %s, running on %s (same architecture): it works but may be slower",
                    sidecar.engine, built.gpu_name, here.gpu_name)
    if built.cuda_version.split(".")[0] != here.cuda_version.split(".")[0]:
        log.warning("engine %s was built with CUDA %s, running with CUDA %s",
                    sidecar.engine, built.cuda_version, here.cuda_version)


def _atomic_write(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def file_sha256(onnx_path: str | Path) -> str:
    """sha256 over the graph file and the external-data files it names, in a stable order."""
    path = Path(onnx_path)
    model = _load_graph_only(path)
    locations = sorted({entry.value for t in model.graph.initializer for entry in t.external_data
                        if entry.key == "location"})
    digest = hashlib.sha256()
    for file in [path] + [path.parent / loc for loc in locations]:
        digest.update(file.name.encode())
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# TensorRT and CUDA (GPU machines only)
# --------------------------------------------------------------------------------------------------
def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        raise BackendUnavailableError(f"TensorRT is not installed here (import tensorrt: {exc}). {INSTALL_HINT}") \
            from exc
    if int(trt.__version__.split(".")[0]) < 10:
        raise BackendUnavailableError(f"skipit needs TensorRT ≥ 10, found {trt.__version__}. {INSTALL_HINT}")
    return trt


def _require_cuda() -> torch.device:
    import torch

    if not torch.cuda.is_available():
        why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise BackendUnavailableError(f"CUDA is unavailable ({why}). {INSTALL_HINT}")
    return torch.device("cuda", torch.cuda.current_device())


def current_env(trt: Any = None) -> EngineEnv:
    """TensorRT version, CUDA version (torch's), GPU name and compute capability of this machine."""
    import torch

    trt = trt or _import_tensorrt()
    device = _require_cuda()
    major, minor = torch.cuda.get_device_capability(device)
    return EngineEnv(trt.__version__, str(torch.version.cuda), torch.cuda.get_device_name(device),
                     f"{major}.{minor}")


@functools.lru_cache(maxsize=1)
def _trt_logger() -> Any:
    """One TensorRT logger per process, forwarding to Python logging."""
    trt = _import_tensorrt()
    sev = trt.ILogger.Severity
    levels = {sev.INTERNAL_ERROR: logging.CRITICAL, sev.ERROR: logging.ERROR, sev.WARNING: logging.WARNING,
              sev.INFO: logging.INFO, sev.VERBOSE: logging.DEBUG}

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            log.log(levels.get(severity, logging.INFO), "TensorRT: %s", msg)

    return _Logger()


def build_engine(
    onnx_path: str | Path,
    out_dir: str | Path,
    profiles: str | Sequence[str | ProfileSpec],
    precision: str = "fp16",
    timing_cache: str | Path | None = None,
    *,
    max_context: int | None = None,
) -> Path:
    """Build ``out_dir/<graph>.engine`` (+ ``<graph>.engine.json`` sidecar) from one ONNX graph.

    Profiles, shapes and operator support are checked first, on any machine; then TensorRT builds one
    optimization profile per :class:`ProfileSpec`. ``precision`` "fp16"/"bf16" lets TensorRT pick those
    kernels (I/O stays as in the graph); "fp32" also turns TF32 off for strict parity. ``timing_cache``
    is read when it exists and written back, so rebuilds are fast. ``max_context`` defaults to the
    model's ``max_position_embeddings`` (:func:`default_max_context`).
    """
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if precision not in PRECISIONS:
        raise InvalidOptionError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)} (--precision)")
    specs = as_profiles(profiles)
    max_context = default_max_context(onnx_path) if max_context is None else max_context
    ranges = shape_ranges(onnx_path, specs, max_context)
    check_trt_compatibility(onnx_path).raise_for_problems()

    trt = _import_tensorrt()
    env = current_env(trt)
    if precision == "bf16" and float(env.compute_capability) < 8.0:
        raise InvalidOptionError(f"bf16 needs compute capability ≥ 8.0 (Ampere); {env.gpu_name} has "
                                 f"{env.compute_capability}: use --precision fp16")
    cache_path = Path(timing_cache) if timing_cache else None
    started = time.perf_counter()
    engine_bytes, cache_bytes = _build_serialized(trt, onnx_path, ranges, precision, cache_path)
    log.info("built TensorRT engine for %s in %.0f s", onnx_path.name, time.perf_counter() - started)

    out_dir.mkdir(parents=True, exist_ok=True)
    engine_path = out_dir / f"{onnx_path.stem}.engine"
    _atomic_write(engine_path, engine_bytes)
    if cache_path is not None:
        _atomic_write(cache_path, cache_bytes)
    write_sidecar(engine_path, _make_sidecar(engine_path, onnx_path, specs, ranges, precision, max_context, env))
    return engine_path


def _make_sidecar(engine_path: Path, onnx_path: Path, specs: Sequence[ProfileSpec],
                  ranges: dict[str, dict[str, ShapeRange]], precision: str, max_context: int,
                  env: EngineEnv) -> EngineSidecar:
    from skipit import __version__

    shapes = {p: {n: r._asdict() for n, r in inputs.items()} for p, inputs in ranges.items()}
    return EngineSidecar(
        engine=engine_path.name, onnx=onnx_path.name, onnx_sha256=file_sha256(onnx_path), precision=precision,
        max_context=max_context, profiles=tuple(str(s) for s in specs),
        shapes=json.loads(json.dumps(shapes)), env=env,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), skipit_version=__version__)


def _build_serialized(trt: Any, onnx_path: Path, ranges: dict[str, dict[str, ShapeRange]], precision: str,
                      cache_path: Path | None) -> tuple[Any, bytes]:
    """Parse the graph and build; returns (serialized engine, serialized timing cache)."""
    logger = _trt_logger()
    try:
        builder = trt.Builder(logger)
    except (RuntimeError, TypeError) as exc:
        raise BackendUnavailableError(f"TensorRT could not create a builder ({exc}). {INSTALL_HINT}") from exc
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = "\n  - ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path.name}:\n  - {errors}")

    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    for name, inputs in ranges.items():
        profile = builder.create_optimization_profile()
        for input_name, (lo, mid, hi) in inputs.items():
            profile.set_shape(input_name, lo, mid, hi)
        if config.add_optimization_profile(profile) < 0:
            raise ExportError(f"TensorRT refused optimization profile {name!r}: {inputs}")
    cache_in = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_in), ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path.name}; its log above says why "
                          f"(run with -v for TensorRT's messages)")
    return serialized, bytes(memoryview(config.get_timing_cache().serialize()))


# --------------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------------
class TrtRunner:
    """Runs a TensorRT engine, Polygraphy-style: ``activate()`` → ``infer(feed)`` → ``close()``.

    Buffers are torch CUDA tensors (no pycuda). The optimization profile is picked by name, by index,
    or automatically as the first whose ranges hold every input shape. ``inference_time`` is the wall
    time in seconds of the last call. The sidecar is checked against this machine on activation.
    """

    def __init__(self, engine_path: str | Path, *, check_env: bool = True) -> None:
        self.engine_path = Path(engine_path)
        self.check_env = check_env
        self.inference_time: float | None = None
        self._trt: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._profile: int | None = None
        self._profile_names: list[str] = []

    # -- lifecycle -----------------------------------------------------------------------------------
    @property
    def is_active(self) -> bool:
        return self._context is not None

    def activate(self) -> TrtRunner:
        """Load the engine onto the GPU (checking the sidecar first)."""
        import torch

        if self.is_active:
            return self
        trt = _import_tensorrt()
        _require_cuda()
        if sidecar_path(self.engine_path).is_file():
            sidecar = read_sidecar(self.engine_path)
            self._profile_names = [p.split("=", 1)[0] for p in sidecar.profiles]
            if self.check_env:
                check_engine_compatible(sidecar, current_env(trt))
        else:
            log.warning("%s has no sidecar: cannot check it was built for this GPU/TensorRT", self.engine_path.name)
        runtime = trt.Runtime(_trt_logger())
        engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise EngineIncompatibleError(f"TensorRT could not load {self.engine_path.name} (built for another "
                                          f"TensorRT version or GPU?); rebuild it here with skipit export … --trt")
        self._trt, self._runtime, self._engine = trt, runtime, engine
        self._context = engine.create_execution_context()
        self._stream = torch.cuda.Stream()
        self._profile = None
        return self

    def close(self) -> None:
        """Free the execution context and engine."""
        self._context = self._engine = self._runtime = self._stream = None
        self._profile = None

    def __enter__(self) -> TrtRunner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metadata ------------------------------------------------------------------------------------
    def _names(self, mode_name: str) -> list[str]:
        mode = getattr(self._trt.TensorIOMode, mode_name)
        names = (self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors))
        return [n for n in names if self._engine.get_tensor_mode(n) == mode]

    @property
    def input_names(self) -> list[str]:
        self._require_active()
        return self._names("INPUT")

    @property
    def output_names(self) -> list[str]:
        self._require_active()
        return self._names("OUTPUT")

    def _require_active(self) -> None:
        if not self.is_active:
            raise ExportError("TrtRunner is not active: call activate() (or use it as a context manager)")

    def _torch_dtype(self, name: str) -> torch.dtype:
        import torch

        dt = self._trt.DataType
        table = {dt.FLOAT: torch.float32, dt.HALF: torch.float16, dt.INT32: torch.int32, dt.INT8: torch.int8,
                 dt.BOOL: torch.bool}
        for trt_name, torch_dtype in (("BF16", torch.bfloat16), ("INT64", torch.int64), ("UINT8", torch.uint8)):
            if hasattr(dt, trt_name):
                table[getattr(dt, trt_name)] = torch_dtype
        return table[self._engine.get_tensor_dtype(name)]

    # -- profiles ------------------------------------------------------------------------------------
    def _pick_profile(self, shapes: Mapping[str, tuple[int, ...]], profile: str | int | None) -> int:
        if isinstance(profile, int):
            return profile
        if isinstance(profile, str):
            if profile not in self._profile_names:
                raise InvalidOptionError(f"engine has no profile {profile!r}; it has {self._profile_names}")
            return self._profile_names.index(profile)
        for index in range(self._engine.num_optimization_profiles):
            if all(self._fits(name, shape, index) for name, shape in shapes.items()):
                return index
        raise InvalidOptionError(
            f"no optimization profile of {self.engine_path.name} holds the input shapes "
            f"{dict(shapes)} (profiles: {self._profile_names or self._engine.num_optimization_profiles}); "
            f"an empty KV cache must be fed as a masked dummy slot (with_dummy_past), or rebuild with wider "
            f"--profiles")

    def _fits(self, name: str, shape: tuple[int, ...], index: int) -> bool:
        lo, _, hi = self._engine.get_tensor_profile_shape(name, index)
        return len(lo) == len(shape) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))

    # -- inference -----------------------------------------------------------------------------------
    def infer_torch(self, feed: Mapping[str, torch.Tensor], profile: str | int | None = None
                    ) -> dict[str, torch.Tensor]:
        """Run on torch tensors (any device); outputs stay on the GPU."""
        import torch

        self._require_active()
        expected = self.input_names
        if sorted(feed) != sorted(expected):
            raise InvalidOptionError(f"feed has inputs {sorted(feed)}, the engine wants {sorted(expected)}")
        started = time.perf_counter()
        index = self._pick_profile({n: tuple(t.shape) for n, t in feed.items()}, profile)
        ctx, stream = self._context, self._stream
        if index != self._profile:
            if not ctx.set_optimization_profile_async(index, stream.cuda_stream):
                raise ExportError(f"TensorRT refused to switch {self.engine_path.name} to profile {index}")
            self._profile = index
        device = torch.device("cuda", torch.cuda.current_device())
        inputs = {n: feed[n].to(device=device, dtype=self._torch_dtype(n)).contiguous() for n in expected}
        for name, tensor in inputs.items():
            if not ctx.set_input_shape(name, tuple(tensor.shape)):
                raise InvalidOptionError(f"{name} shape {tuple(tensor.shape)} is outside profile {index}")
            ctx.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ExportError(f"output {name} has a data-dependent shape {shape}; skipit's runner cannot size it")
            outputs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device=device)
            ctx.set_tensor_address(name, outputs[name].data_ptr())
        stream.wait_stream(torch.cuda.current_stream(device))
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise ExportError(f"TensorRT failed to run {self.engine_path.name} (see its log)")
        torch.cuda.current_stream(device).wait_stream(stream)
        stream.synchronize()
        self.inference_time = time.perf_counter() - started
        return outputs

    def infer(self, feed: Mapping[str, np.ndarray], profile: str | int | None = None) -> dict[str, np.ndarray]:
        """Run on numpy arrays; returns numpy arrays (bf16 outputs as float32)."""
        import numpy as np
        import torch

        tensors = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in feed.items()}
        out = self.infer_torch(tensors, profile)
        return {n: (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy() for n, t in out.items()}
