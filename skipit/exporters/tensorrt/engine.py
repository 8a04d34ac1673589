"""TensorRT engines from skipit's ONNX graphs, built with Polygraphy (``polygraphy.backend.trt``), and the
sidecar that records what each engine was built for.

Profiles, shapes and operator support are checked first, on any machine (:mod:`.profiles`, :mod:`.ops`); then
Polygraphy parses the graph (``NetworkFromOnnxPath``), configures the build (``CreateConfig``: precision flags,
one ``Profile`` per :class:`~skipit.exporters.tensorrt.profiles.ProfileSpec`, the timing cache) and builds
(``EngineBytesFromNetwork``). Polygraphy's and TensorRT's messages go to Python logging (logger
``Polygraphy``). :class:`EngineSidecar` records what an engine was built for, and
:func:`check_engine_compatible` refuses an engine built for another GPU architecture or TensorRT version.

Only :func:`build_engine` and :func:`current_env` need ``tensorrt`` and a CUDA GPU; they import it lazily and
raise :class:`~skipit.errors.BackendUnavailableError` when it is missing.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skipit.atomic import write_atomic
from skipit.errors import BackendUnavailableError, EngineIncompatibleError, ExportError, InvalidOptionError
from skipit.exporters.tensorrt.ops import check_trt_compatibility, load_graph_only
from skipit.exporters.tensorrt.profiles import ProfileSpec, ShapeRange, as_profiles, default_max_context
from skipit.exporters.tensorrt.profiles import polygraphy_profiles, shape_ranges

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "bf16", "fp32")
SIDECAR_FORMAT = "skipit-trt-engine/1"
INSTALL_HINT = (
    "TensorRT engines need an NVIDIA GPU with CUDA: on such a machine run `pip install skipit[gpu]` "
    "(tensorrt>=10, polygraphy and onnxruntime-gpu) with a CUDA build of torch. The ONNX graphs are portable: copy "
    "the onnx/ directory there and build the engines with `skipit export OUT/onnx OUT/engines --trt`."
)


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
    write_atomic(path, json.dumps(sidecar.as_dict(), indent=2))
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


def file_sha256(onnx_path: str | Path) -> str:
    """sha256 over the graph file and the external-data files it names, in a stable order."""
    path = Path(onnx_path)
    model = load_graph_only(path)
    locations = sorted({entry.value for t in model.graph.initializer for entry in t.external_data
                        if entry.key == "location"})
    digest = hashlib.sha256()
    for file in [path] + [path.parent / loc for loc in locations]:
        digest.update(file.name.encode())
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        raise BackendUnavailableError(f"TensorRT is not installed here (import tensorrt: {exc}). {INSTALL_HINT}") \
            from exc
    if int(trt.__version__.split(".")[0]) < 10:
        raise BackendUnavailableError(f"skipit needs TensorRT ≥ 10, found {trt.__version__}. {INSTALL_HINT}")
    return trt


def require_cuda() -> torch.device:
    import torch

    if not torch.cuda.is_available():
        why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise BackendUnavailableError(f"CUDA is unavailable ({why}). {INSTALL_HINT}")
    return torch.device("cuda", torch.cuda.current_device())


def current_env(trt: Any = None) -> EngineEnv:
    """TensorRT version, CUDA version (torch's), GPU name and compute capability of this machine."""
    import torch

    trt = trt or import_tensorrt()
    device = require_cuda()
    major, minor = torch.cuda.get_device_capability(device)
    return EngineEnv(trt.__version__, str(torch.version.cuda), torch.cuda.get_device_name(device),
                     f"{major}.{minor}")


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

    trt = import_tensorrt()
    env = current_env(trt)
    if precision == "bf16" and float(env.compute_capability) < 8.0:
        raise InvalidOptionError(f"bf16 needs compute capability ≥ 8.0 (Ampere); {env.gpu_name} has "
                                 f"{env.compute_capability}: use --precision fp16")
    cache_path = Path(timing_cache) if timing_cache else None
    started = time.perf_counter()
    engine_bytes = _build_serialized(onnx_path, ranges, precision, cache_path)
    log.info("built TensorRT engine for %s in %.0f s", onnx_path.name, time.perf_counter() - started)

    engine_path = out_dir / f"{onnx_path.stem}.engine"
    # Polygraphy's SaveEngine writes in place; an engine is written beside its final name and renamed instead
    write_atomic(engine_path, memoryview(engine_bytes))  # type: ignore[arg-type] # a buffer: no copy of the engine
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


def polygraphy_logging() -> None:
    """Send Polygraphy's messages (and TensorRT's, which it forwards) to Python logging, at skipit's verbosity;
    :class:`BackendUnavailableError` when Polygraphy is not installed."""
    try:
        from polygraphy.logger import G_LOGGER
    except ImportError as exc:
        raise BackendUnavailableError(f"TensorRT engines are built and run with Polygraphy, which is not importable "
                                      f"({exc}): pip install polygraphy (part of skipit[gpu])") from None

    G_LOGGER.use_python_logging_system = True
    G_LOGGER.module_severity = G_LOGGER.VERBOSE if log.isEnabledFor(logging.DEBUG) else G_LOGGER.WARNING


def _build_serialized(onnx_path: Path, ranges: dict[str, dict[str, ShapeRange]], precision: str,
                      cache_path: Path | None) -> Any:
    """Parse the graph and build with Polygraphy; returns the serialized engine.

    The timing cache is read when it exists and merged back after the build under Polygraphy's lock file (so
    concurrent builds do not lose each other's entries), hence not written through :func:`write_atomic`.
    """
    polygraphy_logging()
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath
    from polygraphy.exception import PolygraphyException

    config = CreateConfig(
        fp16=precision == "fp16", bf16=precision == "bf16",
        tf32=precision != "fp32",  # TensorRT's default; "fp32" turns it off for strict parity
        profiles=polygraphy_profiles(ranges),
        load_timing_cache=str(cache_path) if cache_path is not None and cache_path.is_file() else None,
    )
    build = EngineBytesFromNetwork(NetworkFromOnnxPath(str(onnx_path)), config=config,
                                   save_timing_cache=str(cache_path) if cache_path is not None else None)
    try:
        return build()
    except PolygraphyException as exc:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path.name} ({exc}); TensorRT's and "
                          f"Polygraphy's messages above say why (run with -v for all of them)") from None
    except (RuntimeError, TypeError) as exc:
        raise BackendUnavailableError(f"TensorRT could not create a builder ({exc}). {INSTALL_HINT}") from exc
