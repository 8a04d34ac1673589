"""Optional dependencies, checked before any work: an option that needs an extra which is not installed
stops at once with the exact ``pip install`` line (exit 2), not after a long certification."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from skipit.errors import InvalidOptionError

#: extra → (modules it provides, what needs it)
EXTRAS: dict[str, tuple[tuple[str, ...], str]] = {
    "gguf": (("gguf",), "reading a .gguf model"),
    "onnx": (("onnx", "onnxruntime"), "ONNX export and ONNX parity"),
    "onnx-dynamo": (("onnxscript",), "ONNX export through torch.onnx's dynamo route"),
    "optimum": (("optimum.exporters.onnx",), "--backend optimum"),
}
#: extra → the pip extra that installs it (the dynamo route's onnxscript comes with skipit[onnx])
_PIP_EXTRA = {"onnx-dynamo": "onnx"}


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    modules, _ = EXTRAS[extra]
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            out.append(name)
    return out


def require(*extras: str) -> None:
    """Raise :class:`InvalidOptionError` (exit 2) naming the pip line when an extra is not installed."""
    for extra in extras:
        lacking = missing(extra)
        if lacking:
            pip = _PIP_EXTRA.get(extra, extra)
            raise InvalidOptionError(f"{EXTRAS[extra][1]} needs {', '.join(lacking)}, which is not installed: "
                                     f"pip install 'skipit[{pip}]'")


def for_model(path: str | Path) -> list[str]:
    """Extras that loading ``path`` needs."""
    return ["gguf"] if Path(path).suffix == ".gguf" else []


def for_onnx(backend: str, exporter: str) -> list[str]:
    """Extras that an ONNX export with ``backend`` / ``exporter`` needs."""
    if backend == "optimum":
        return ["onnx", "optimum"]
    return ["onnx"] + (["onnx-dynamo"] if exporter in ("dynamo", "auto") else [])


def for_compress(model_path: str | Path, options: Any) -> list[str]:
    """Extras a ``skipit-compress`` run with ``options`` (:class:`~skipit.pipeline.CompressOptions`) needs."""
    needed = for_model(model_path)
    if "onnx" in options.export:
        needed += for_onnx(options.backend, options.exporter)
    return needed
