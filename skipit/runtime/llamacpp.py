"""Run GGUF files in llama.cpp itself: greedy continuations and the layer count llama.cpp sees.

llama.cpp comes from node-llama-cpp (npm), which ships prebuilt CPU binaries, so nothing is compiled::

    npm i -E node-llama-cpp@3.21.1          # in some folder: pass it as node_dir or set SKIPIT_NODE_DIR

:func:`llamacpp_greedy` starts one ``node`` process for all the models and prompts it is given (each
model is loaded once) and returns, per model, its architecture, ``block_count`` as llama.cpp read it,
and for each prompt the prompt tokens and the greedily generated tokens and text. Decoding is pure
greedy (temperature 0, no repeat penalty, which node-llama-cpp's ``LlamaCompletion`` would otherwise
apply) and keeps a final end-of-generation token, as transformers' ``generate`` keeps EOS, so the
token lists compare directly with :func:`skipit.runtime.torch_runner.hf_greedy`'s.

Threads default to 1: on a 2-core machine llama.cpp's default thread count made a 12-token
continuation of the 135M SmolLM2 take 88 s instead of 0.3 s (measured).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from skipit.errors import BackendUnavailableError, ExportError, InvalidOptionError

log = logging.getLogger(__name__)

NODE_LLAMA_CPP_VERSION = "3.21.1"
NODE_DIR_ENV = "SKIPIT_NODE_DIR"
_SCRIPT = Path(__file__).with_name("llamacpp_greedy.mjs")
_INSTALL = (f"install it with `npm i -E node-llama-cpp@{NODE_LLAMA_CPP_VERSION}` in a folder and pass that "
            f"folder (node_dir=, or the {NODE_DIR_ENV} environment variable)")


@dataclass
class LlamaCppRun:
    """One GGUF run in llama.cpp: what llama.cpp read from the file and its greedy continuations."""

    path: str
    architecture: str
    block_count: int
    total_layers: int  # node-llama-cpp's count: blocks + the output layer
    prompt_tokens: list[list[int]] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def find_node_llama_cpp(node_dir: str | os.PathLike | None = None) -> Path:
    """The folder whose ``node_modules`` (or a parent's) holds node-llama-cpp, and check ``node`` exists.

    ``node_dir`` defaults to ``$SKIPIT_NODE_DIR``, else the current directory. Raises
    :class:`BackendUnavailableError` saying how to install what is missing.
    """
    node = shutil.which("node")
    if node is None:
        raise BackendUnavailableError(f"running a GGUF in llama.cpp needs Node.js (`node` is not on PATH); "
                                      f"install Node.js ≥ 20, then {_INSTALL}")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    major = version.lstrip("v").split(".")[0]
    if not (major.isdigit() and int(major) >= 20):
        raise BackendUnavailableError(f"node-llama-cpp needs Node.js ≥ 20; `node --version` says {version or 'nothing'}")
    base = Path(node_dir or os.environ.get(NODE_DIR_ENV) or Path.cwd()).resolve()
    for folder in (base, *base.parents):
        if (folder / "node_modules" / "node-llama-cpp" / "package.json").is_file():
            return folder
    raise BackendUnavailableError(f"node-llama-cpp is not installed in {base} or above it; {_INSTALL}")


def llamacpp_unavailable(node_dir: str | os.PathLike | None = None) -> str | None:
    """Why llama.cpp cannot run here (missing node or node-llama-cpp), or None when it can."""
    try:
        find_node_llama_cpp(node_dir)
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def llamacpp_greedy(
    models: Sequence[str | os.PathLike],
    prompts: Sequence[str | Sequence[int]],
    *,
    max_new_tokens: int = 12,
    threads: int = 1,
    context_size: int = 256,
    node_dir: str | os.PathLike | None = None,
    timeout_s: float = 600,
) -> list[LlamaCppRun]:
    """Greedy continuations of ``prompts`` by each GGUF in ``models``, run by llama.cpp on the CPU.

    Args:
        models: GGUF files; each is loaded once.
        prompts: text (tokenized by llama.cpp with the GGUF's own BOS rule) or token ids (used as given).
        max_new_tokens: tokens to generate per prompt (fewer when an end-of-generation token comes first).
        threads: llama.cpp threads.
        context_size: context length to allocate; must hold the longest prompt + ``max_new_tokens``.
        node_dir: where node-llama-cpp is installed (see :func:`find_node_llama_cpp`).
        timeout_s: limit for the whole node process.

    Returns:
        One :class:`LlamaCppRun` per model, in order.

    Raises:
        BackendUnavailableError: node or node-llama-cpp is missing.
        ExportError: llama.cpp cannot load or run a file (the message carries llama.cpp's error).
    """
    if max_new_tokens < 0 or threads < 1 or context_size < 1:
        raise InvalidOptionError(f"max_new_tokens must be ≥ 0, threads and context_size ≥ 1 "
                                 f"(got {max_new_tokens}, {threads}, {context_size})")
    folder = find_node_llama_cpp(node_dir)
    paths = [str(Path(m).resolve()) for m in models]
    for p in paths:
        if not Path(p).is_file():
            raise ExportError(f"{p} does not exist; nothing to run in llama.cpp")
    request = {
        "node_dir": str(folder), "models": paths, "max_tokens": max_new_tokens, "threads": threads,
        "context_size": context_size,
        "prompts": [p if isinstance(p, str) else [int(t) for t in p] for p in prompts],
    }
    with tempfile.TemporaryDirectory(prefix="skipit-llamacpp-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        log.info("llama.cpp (node-llama-cpp in %s): %d model(s) × %d prompt(s), %d tokens each",
                 folder, len(paths), len(prompts), max_new_tokens)
        try:
            proc = subprocess.run(["node", str(_SCRIPT), str(req), str(res)], capture_output=True, text=True,
                                  timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise ExportError(f"llama.cpp did not finish within {timeout_s:.0f} s on {', '.join(paths)}; "
                              "raise timeout_s or threads") from None
        if proc.returncode != 0 or not res.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise ExportError(f"llama.cpp failed on {', '.join(paths)} (node exit code {proc.returncode}):\n{tail}")
        result = json.loads(res.read_text())
    if result["version"] != NODE_LLAMA_CPP_VERSION:
        log.warning("node-llama-cpp %s found; skipit is tested with %s", result["version"], NODE_LLAMA_CPP_VERSION)
    return [
        LlamaCppRun(
            path=m["path"], architecture=m["architecture"], block_count=int(m["block_count"]),
            total_layers=int(m["total_layers"]),
            prompt_tokens=[r["prompt_tokens"] for r in m["results"]],
            tokens=[r["tokens"] for r in m["results"]],
            texts=[r["text"] for r in m["results"]],
        )
        for m in result["models"]
    ]


__all__ = ["LlamaCppRun", "find_node_llama_cpp", "llamacpp_greedy", "llamacpp_unavailable"]
