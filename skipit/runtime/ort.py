"""onnxruntime: sessions and providers, and an exported model (merged text decoder or split VLM graphs) as a
:class:`~skipit.runtime.base.Runner`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from skipit.errors import BackendUnavailableError, ExportError
from skipit.runtime.base import HostTimedRunner


def onnxruntime() -> Any:
    """The ``onnxruntime`` module; :class:`BackendUnavailableError` saying how to install it."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BackendUnavailableError(f"onnxruntime is not installed ({exc}): pip install 'skipit[onnx]'") from None
    return ort


def ort_session(path: str | os.PathLike, providers: list[str] | None = None, session_options: Any = None) -> Any:
    """An ``InferenceSession`` for the graph at ``path`` (``providers`` default: CPUExecutionProvider)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist: export the model first")
    return onnxruntime().InferenceSession(str(path), sess_options=session_options,
                                          providers=providers or ["CPUExecutionProvider"])


def ort_providers(device: str = "auto") -> list[str]:
    """ONNX Runtime execution providers for ``device`` (``auto``: CUDA when present, else CPU)."""
    available = onnxruntime().get_available_providers()
    if device.startswith("cuda") or (device == "auto" and "CUDAExecutionProvider" in available):
        if "CUDAExecutionProvider" not in available:
            raise BackendUnavailableError(
                f"ONNX Runtime has no CUDA provider here (available: {', '.join(available)}); "
                "install onnxruntime-gpu (pip install skipit[gpu]) or run on CPU")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_onnx(onnx_path: str | os.PathLike, device: str = "auto", threads: int | None = None,
              spin_between_runs: bool = True) -> Any:
    """An :class:`~skipit.runtime.ort_text.OrtDecoderRunner` for a merged decoder graph, an
    :class:`~skipit.runtime.ort_vlm.OrtVlmRunner` for a split VLM export (``onnx_path`` is then its folder).

    ``threads`` sets ONNX Runtime's intra-op threads (default: its own choice). Without ``spin_between_runs``
    its workers stop spinning at the end of each run (``session.force_spinning_stop``).
    """
    from skipit.exporters.onnx.convention import find_split_export
    from skipit.runtime.ort_text import OrtDecoderRunner
    from skipit.runtime.ort_vlm import OrtVlmRunner

    providers = ort_providers(device)
    options = onnxruntime().SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spin_between_runs:
        # ORT's intra-op workers spin-wait after each run by default, burning a core for tens of milliseconds
        # (measured: benchmarks/speed.py); the runner measured next would pay for it. Spin within a run only.
        options.add_session_config_entry("session.force_spinning_stop", "1")
    split = find_split_export(onnx_path)
    if split is not None:
        return OrtVlmRunner(split[0], providers=providers, session_options=options, onnx_dir=split[1])
    return OrtDecoderRunner(onnx_path, providers=providers, session_options=options)


class OrtRunner(HostTimedRunner):
    """An exported decoder graph, or the split graphs of a VLM export (``onnx_path`` is then their folder; text
    prompts go through embeddings → decoder, as :class:`~skipit.runtime.torch_runner.TorchRunner` runs a VLM
    on text), timed by the host clock.

    ``threads`` sets ONNX Runtime's intra-op threads (default: its own choice); give torch the same
    (``torch.set_num_threads``) for a fair CPU comparison. Its workers stop spinning at the end of each run
    (``session.force_spinning_stop``) unless ``spin_between_runs``: a spinning pool would slow the next runner.
    """

    def __init__(self, onnx_path: str | Path, name: str = "ort", device: str = "auto", vocab_size: int | None = None,
                 threads: int | None = None, spin_between_runs: bool = False) -> None:
        decoder = open_onnx(onnx_path, device, threads, spin_between_runs)
        self.runner = decoder
        graph_vocab = decoder.vocab_size
        super().__init__(decoder, name, "cuda" if decoder.providers[0].startswith("CUDA") else "cpu",
                         int(vocab_size or (graph_vocab if isinstance(graph_vocab, int) else 0)))
