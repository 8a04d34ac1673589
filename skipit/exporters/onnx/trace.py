"""Tracing one graph: a wrapper module with an explicit signature → an ``onnx_ir`` model with the final names.

``torch.onnx.export(dynamo=True)`` is the default route; ``exporter="legacy"`` uses the TorchScript
exporter, ``"auto"`` tries the routes of the architecture's record in order (dynamo, then legacy) and falls
back on failure. Both give the same results (max abs logits error vs torch ~1e-7 on toy models, ~1e-4 on
SmolLM2-135M at logit scale 31). Measured on two shared CPU cores: toy 6-layer text models 20–50 s dynamo vs
2–8 s legacy; SmolLM2-135M (30 layers) 184 s dynamo vs 67 s legacy, verification included. Legacy stores a
tied embedding twice (the constant-folded, transposed LM head: +113 MB on SmolLM2); dynamo stores it once.

Traced constants: a float ``torch.arange`` with constant arguments is sized in double precision by torch and
in float32 by ONNX ``Range``; the dynamo route therefore emits torch's own values (:func:`dynamo_translations`),
which Idefics3's position buckets of a 6×6 patch grid need.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from skipit.compat import torchscript_patches
from skipit.errors import ExportError
from skipit.exporters.onnx.config import OnnxExportConfig

log = logging.getLogger(__name__)


@dataclass
class Graph:
    """One graph to export: the wrapper, example args, I/O names with their dynamic axes, and how to trace it.

    ``named_dims``: give torch.export one named ``Dim`` per axis name (the text decoder's route, whose graph
    names its dimensions itself) instead of ``Dim.AUTO`` with the names put on afterwards (VLM graphs: torch.export
    infers which axes are equal and the relations the model implies, e.g. patches divisible by the merge size).
    ``build``: produce the graph another way than tracing (optimum's exporter), returning (model, route).
    """

    key: str  # "vision" / "embed" / "decoder" (the record's routes key)
    file: str
    wrapper: Any
    args: tuple
    input_names: list[str]
    output_names: list[str]
    axes: dict[str, dict[int, str]]  # inputs and outputs
    routes: list[str] = field(default_factory=lambda: ["dynamo"])
    patches: Callable[[], Any] = field(default=contextlib.nullcontext)
    named_dims: bool = False
    build: Callable[[Path], tuple[Any, str]] | None = None


def trace(graph: Graph, config: OnnxExportConfig, tmp: Path) -> tuple[Any, str]:
    """Export ``graph`` with its routes in order (falling back on failure); check its I/O names.

    Returns (onnx_ir model, route used). Raises :class:`ExportError` listing every route's failure.
    """
    if graph.build is not None:
        with warnings_to_debug():
            model_ir, route = graph.build(tmp)
        check_graph_io(model_ir, graph)
        return model_ir, route
    errors: list[str] = []
    routes = graph.routes
    for route in routes:
        t0 = time.perf_counter()
        try:
            model_ir = _export(graph, route, config, tmp)
        except Exception as exc:  # noqa: BLE001 - any tracer failure is reported, or falls back
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            errors.append(f"{route}: {type(exc).__name__}: {first}")
            if route != routes[-1]:
                log.warning("%s: %s export failed (%s); trying %s", graph.file, route, first, routes[-1])
                continue
            hint = "another opset" if config.exporter == "auto" else \
                "OnnxExportConfig(exporter='auto') (CLI: --exporter auto) or another opset"
            raise ExportError(f"ONNX export of {graph.file} failed: {'; '.join(errors)}. Try {hint}") from exc
        log.info("%s: %s exporter traced the graph in %.1f s", graph.file, route, time.perf_counter() - t0)
        check_graph_io(model_ir, graph)
        return model_ir, route
    raise AssertionError("unreachable")  # pragma: no cover


def _export(graph: Graph, route: str, config: OnnxExportConfig, tmp: Path) -> Any:
    """Trace ``graph`` with one exporter; return an onnx_ir model with the final names."""
    import torch

    with warnings_to_debug(), torch.no_grad(), graph.patches():
        if route == "dynamo":
            model_ir = _dynamo(graph, config)
            if not graph.named_dims:
                rename_dims(model_ir, graph.axes)
            return model_ir
        return _legacy(graph, config, tmp / f"legacy-{graph.file}")


def _dynamo(graph: Graph, config: OnnxExportConfig) -> Any:
    import torch

    program = torch.onnx.export(
        graph.wrapper, graph.args, dynamo=True, dynamic_shapes=dynamic_shapes(graph),
        input_names=graph.input_names, output_names=graph.output_names,
        opset_version=config.opset, optimize=True, verbose=False,
        custom_translation_table=dynamo_translations(),
    )
    if program is None:  # torch returns None only when asked to write a file, which this call does not
        raise ExportError(f"torch.onnx.export returned no program for {graph.file}")
    return program.model


def _legacy(graph: Graph, config: OnnxExportConfig, path: Path) -> Any:
    # The tracer warns about Python branches on shapes in transformers' mask code: the branches taken for the
    # example (no mask padding needed, no cache-free shortcut) are the right ones for every input that follows
    # the convention, and the verification runs the graph on other shapes.
    import onnx_ir as ir
    import torch

    with torchscript_patches():
        torch.onnx.export(
            graph.wrapper, graph.args, str(path), dynamo=False,
            input_names=graph.input_names, output_names=graph.output_names,
            dynamic_axes={k: dict(v) for k, v in graph.axes.items()},
            opset_version=config.opset, do_constant_folding=True,
        )
    return ir.load(path)


def dynamic_shapes(graph: Graph) -> Any:
    """torch.export dynamic_shapes mirroring ``graph.args`` (nested lists/tuples too), from the flat axes:
    one named ``Dim`` per axis name (``named_dims``) or ``Dim.AUTO`` for every listed axis."""
    import torch
    from torch.utils import _pytree as pytree

    leaves, spec = pytree.tree_flatten(graph.args)
    if len(leaves) != len(graph.input_names):
        raise AssertionError(f"{len(leaves)} example tensors for {len(graph.input_names)} input names")  # pragma: no cover
    dims: dict[str, Any] = {}

    def dim(label: str) -> Any:
        if not graph.named_dims:
            return torch.export.Dim.AUTO
        return dims.setdefault(label, torch.export.Dim(label))

    per_leaf = [{d: dim(label) for d, label in graph.axes.get(name, {}).items()} or None
                for name in graph.input_names]
    return pytree.tree_unflatten(per_leaf, spec)


def rename_dims(model_ir: Any, axes: Mapping[str, Mapping[int, str]]) -> None:
    """Give dynamo's symbolic dims (s0, s1 …) the readable names of ``axes`` (inputs and outputs)."""
    import onnx_ir as ir

    values = {v.name: v for v in (*model_ir.graph.inputs, *model_ir.graph.outputs)}
    for name, dims in axes.items():
        value = values.get(name)
        if value is None or value.shape is None:
            continue
        shape = list(value.shape)
        for d, label in dims.items():
            if d < len(shape) and not isinstance(shape[d], int):
                shape[d] = ir.SymbolicDim(label)
        value.shape = ir.Shape(shape)


def check_graph_io(model_ir: Any, graph: Graph) -> None:
    """The graph has exactly the inputs and outputs the convention promises."""
    got_in = [v.name for v in model_ir.graph.inputs]
    got_out = [v.name for v in model_ir.graph.outputs]
    if got_in != graph.input_names or got_out != graph.output_names:
        raise ExportError(
            f"{graph.file}: exported graph has inputs {got_in[:5]}… ({len(got_in)}) and outputs {got_out[:3]}… "
            f"({len(got_out)}); expected {graph.input_names[:5]}… ({len(graph.input_names)}) and "
            f"{graph.output_names[:3]}… ({len(graph.output_names)}). This is a bug in skipit's exporter: please "
            "report it"
        )


def strip_debug_metadata(model_ir: Any) -> None:
    """Drop the dynamo exporter's per-node debug records (FX node, Python stack trace with local file
    paths, module names): for a toy model they are 40% of the file, and they leak the build machine's
    paths into a shipped artifact."""
    import onnx_ir as ir

    for node in ir.traversal.RecursiveGraphIterator(model_ir.graph):
        node.metadata_props.clear()


def initializer_bytes(model_ir: Any) -> int:
    return sum(int(v.const_value.nbytes) for v in model_ir.graph.initializers.values() if v.const_value is not None)


def dynamo_translations() -> dict[Any, Any]:
    """Custom ATen → ONNX translations for ``torch.onnx.export(dynamo=True, custom_translation_table=…)``.

    ``aten.arange.start_step`` with constant, non-integral arguments becomes the constant torch computes.
    torch sizes a float ``arange`` in double precision, the ONNX ``Range`` that torchlib emits in float32,
    so the two can differ by one element while ops traced after it keep torch's length: Idefics3's
    ``torch.arange(1/6, 1.0, 1/6)`` (position buckets of a 6×6 patch grid) has 6 elements in torch and 5
    in ONNX, and its ``bucketize`` then gathers out of range (onnxruntime: "GatherND … invalid index
    found, index = 5"). Dynamic or all-integer arguments keep torchlib's translation.
    """
    import onnx_ir as ir
    import torch

    try:
        from onnxscript import opset18 as op
        from onnxscript.function_libs.torch_lib.ops.core import aten_arange_start_step
    except ImportError as exc:  # pragma: no cover - another onnxscript layout: torchlib's own translation
        log.debug("constant-arange translation unavailable (%s); float aranges may be sized in float32", exc)
        return {}

    # ONNX dtype codes (absent: torch's default float dtype) → torch dtype
    float_dtypes = {-1: None, None: None, ir.DataType.FLOAT: torch.float32, ir.DataType.DOUBLE: torch.float64}

    def arange_start_step(start: Any, end: Any, step: Any = 1, dtype: int = -1, layout: str = "",
                          device: str = "", pin_memory: bool = False) -> Any:
        args = (start, end, step)
        constant = all(isinstance(x, (int, float)) for x in args) and not all(isinstance(x, int) for x in args)
        if not constant or dtype not in float_dtypes:
            return aten_arange_start_step(start, end, step, dtype, layout, device, pin_memory)
        value = ir.tensor(torch.arange(start, end, step, dtype=float_dtypes[dtype]).numpy())
        return op.Constant(value=value)  # type: ignore[arg-type]  # onnxscript accepts its own ir tensors

    return {torch.ops.aten.arange.start_step: arange_start_step}


@contextlib.contextmanager
def warnings_to_debug() -> Iterator[None]:
    """Exporter chatter (tracer warnings, axis-renaming notes, deprecations) goes to the debug log."""
    # torch.onnx logs "torchvision is not installed. Skipping torchvision::nms" and the like at WARNING
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        quiet.setLevel(level)
    for w in caught:
        log.debug("exporter warning: %s: %s", w.category.__name__, str(w.message).splitlines()[0])
