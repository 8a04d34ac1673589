"""Will TensorRT parse this ONNX graph? Checked on any machine, without TensorRT.

The operator table is data: ``trt_ops.json`` beside this module names the TensorRT version it describes
(:data:`TRT_OPS_VERSION`), its source, the opset range, the supported default-domain operators, the ones only
recent releases parse, and why foreign domains cannot be parsed. Update that file, not this code, for a new
TensorRT release.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skipit.errors import ExportError, first_line

if TYPE_CHECKING:  # pragma: no cover
    import onnx

log = logging.getLogger(__name__)

_TABLE = json.loads(Path(__file__).with_name("trt_ops.json").read_text(encoding="utf-8"))
#: The TensorRT release the table describes.
TRT_OPS_VERSION: str = _TABLE["tensorrt_version"]
#: Default-domain operators TensorRT's ONNX parser supports.
TRT_ONNX_OPS: frozenset[str] = frozenset(_TABLE["operators"])
#: Operators the table lists but that only recent TensorRT 10 releases parse → the first release that does.
TRT_OPS_SINCE: dict[str, str] = dict(_TABLE["operators_since"])
TRT_MIN_OPSET, TRT_MAX_OPSET = int(_TABLE["opsets"]["min"]), int(_TABLE["opsets"]["max"])
TRT_10_0_MAX_OPSET = int(_TABLE["opsets"]["max_tensorrt_10_0"])
_FOREIGN_DOMAINS: dict[str, str] = dict(_TABLE["foreign_domains"])
_PLUGIN_DOMAINS = tuple(_TABLE["plugin_domains"])


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
        problems.append(f"onnx.checker failed: {first_line(exc)}")
    model = load_graph_only(path)
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
                        f"{TRT_10_0_MAX_OPSET}, {TRT_OPS_VERSION} up to {TRT_MAX_OPSET}); opset 18 works everywhere")
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


def load_graph_only(onnx_path: str | Path) -> onnx.ModelProto:
    path = Path(onnx_path)
    if not path.is_file():
        raise ExportError(f"ONNX graph {path} does not exist; export it first (skipit export MODEL OUT/onnx)")
    try:
        return _load_graph_cached(str(path.resolve()), path.stat().st_mtime)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and friends
        raise ExportError(f"cannot read {path} as ONNX ({exc}); re-export it") from exc
