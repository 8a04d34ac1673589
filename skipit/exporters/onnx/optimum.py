"""Text-decoder ONNX export through optimum's exporter (``--backend optimum``).

optimum-onnx 0.1.0 is the newest optimum ONNX exporter and needs transformers < 4.58, so this route
exists only in such an environment (``make test-optimum`` builds one: transformers 4.57.6, optimum
2.1.0, optimum-onnx 0.1.0). It produces the same graph convention as skipit's own exporter
(``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value`` →
``logits``, ``present.{i}.*``), and the rest of the pipeline is shared: I/O check against the slim
config, side files, verification against the torch model with onnxruntime, atomic move into place.

optimum reads the checkpoint with transformers 4.x. A config saved by 5.x keeps RoPE settings under
``rope_parameters``, which 4.x ignores (it silently falls back to theta 10000, and optimum's own
validation compares against the same wrongly loaded model); the export therefore reads a staged copy
whose config carries both spellings (:func:`skipit.compat.portable_config`), and skipit verifies the
graph against the model loaded by the running transformers.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from skipit.compat import portable_config
from skipit.errors import BackendUnavailableError

log = logging.getLogger(__name__)

_TASK = "text-generation-with-past"
_INSTALL = ("pip install 'transformers==4.57.6' 'optimum==2.1.0' 'optimum-onnx==0.1.0' in a separate environment "
            "(optimum's ONNX exporter does not support transformers 5.x), or use --backend torch")


def optimum_available() -> bool:
    """Whether optimum's ONNX exporter can be imported here."""
    return importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.exporters.onnx") is not None


def export_with_optimum(model_dir: Path, work_dir: Path, opset: int) -> Any:
    """Run optimum's ``text-generation-with-past`` export of ``model_dir`` in ``work_dir``; return the
    graph as an ``onnx_ir`` model (weights loaded lazily from ``work_dir``).

    Raises:
        BackendUnavailableError: optimum-onnx is not importable (e.g. under transformers 5.x).
    """
    import onnx_ir as ir

    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        import transformers

        raise BackendUnavailableError(
            f"--backend optimum needs optimum-onnx, which is not importable with transformers "
            f"{transformers.__version__} ({exc}). {_INSTALL}"
        ) from None
    source = _portable_copy(model_dir, work_dir / "optimum-src")
    out = work_dir / "optimum-out"
    log.info("exporting %s with optimum's %s exporter (opset %d)", model_dir, _TASK, opset)
    # skipit verifies the graph itself, against the model as the running transformers loads it
    main_export(str(source), out, task=_TASK, opset=opset, device="cpu", do_validation=False,
                trust_remote_code=False, library_name="transformers")
    graph = out / "model.onnx"
    if not graph.is_file():
        raise BackendUnavailableError(f"optimum wrote no model.onnx (found {sorted(p.name for p in out.iterdir())})")
    return ir.load(graph)


def _portable_copy(model_dir: Path, dest: Path) -> Path:
    """``dest``: links to every file of ``model_dir``, with a config.json readable by transformers 4.x."""
    dest.mkdir(parents=True)
    for src in model_dir.iterdir():
        if src.is_file() and src.name != "config.json":
            os.symlink(src.resolve(), dest / src.name)
    config = portable_config(json.loads((model_dir / "config.json").read_text()))
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest
