"""Differences between transformers 4.x and 5.x that skipit's files must survive.

skipit runs on transformers 5.x and on 4.57 (the newest release optimum's ONNX exporter supports).
A checkpoint saved by one must load correctly in the other; the one silent break measured is RoPE:
5.x moves ``rope_theta`` (and the scaling dict) under ``rope_parameters``, and 4.x, not finding
``rope_theta``, falls back to 10000 without a warning. :func:`portable_config` writes both spellings.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from importlib import metadata
from pathlib import Path
from typing import Any, Collection, Iterator, Sequence

from skipit.atomic import write_atomic

#: Major version of the installed transformers (read without importing it: ``--help`` stays fast).
TRANSFORMERS_MAJOR = int(metadata.version("transformers").split(".")[0])

_NESTED_CONFIGS = ("text_config",)
_PLAIN_ROPE_KEYS = {"rope_type", "rope_theta"}


def _rope_for_4x(params: dict[str, Any]) -> dict[str, Any]:
    """The 4.x keys (``rope_theta``, ``rope_scaling``) equivalent to one 5.x ``rope_parameters`` dict."""
    out: dict[str, Any] = {}
    if "rope_theta" in params:
        out["rope_theta"] = params["rope_theta"]
    if params.get("rope_type", "default") != "default" or set(params) - _PLAIN_ROPE_KEYS:
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}  # e.g. llama3, M-RoPE sections
    return out


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a config.json dict) plus the 4.x spelling of its RoPE settings, where 5.x wrote them.

    Keys already present are kept. Per-layer-type RoPE (Gemma-3: ``{"full_attention": {...},
    "sliding_attention": {...}}``) maps to 4.x's ``rope_theta`` + ``rope_local_base_freq``.
    """
    out = dict(config)
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        if isinstance(params.get("full_attention"), dict):
            extra = _rope_for_4x(params["full_attention"])
            local = params.get("sliding_attention") or {}
            if "rope_theta" in local:
                extra["rope_local_base_freq"] = local["rope_theta"]
        else:
            extra = _rope_for_4x(params)
        for key, value in extra.items():
            out.setdefault(key, value)
    for key in _NESTED_CONFIGS:
        if isinstance(config.get(key), dict):
            out[key] = portable_config(config[key])
    return out


def make_config_portable(model_dir: Path) -> None:
    """Rewrite ``model_dir/config.json`` with :func:`portable_config` (no change when nothing is missing)."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    portable = portable_config(config)
    if portable != config:
        write_atomic(path, json.dumps(portable, indent=2, sort_keys=True) + "\n")


#: The tokenizer class every client reads a ``tokenizer.json`` with.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def make_tokenizer_portable(folder: Path, input_names: Sequence[str] = ("input_ids", "attention_mask"), *,
                            replace: Collection[str] | None = None) -> bool:
    """Name a ``tokenizer.json``-backed tokenizer ``PreTrainedTokenizerFast`` in ``folder/tokenizer_config.json``.

    transformers 5.x writes ``"tokenizer_class": "TokenizersBackend"``, which 4.x (optimum's environment)
    refuses; 4.57 writes a GGUF architecture's class ("LlamaTokenizer" for SmolLM2's GPT-2-style BPE), which
    transformers.js would treat as SentencePiece. ``PreTrainedTokenizerFast`` loads in 4.57, 5.x,
    transformers.js and onnxruntime-genai alike and runs tokenizer.json as saved. Its default inputs include
    ``token_type_ids`` on 4.x (which ``generate()`` refuses), so ``input_names`` are written too when the
    config names none.

    Args:
        folder: a folder with ``tokenizer.json`` and ``tokenizer_config.json`` (else nothing happens).
        input_names: the tokenizer's model input names.
        replace: only these classes are replaced (a user's own tokenizer files keep their class otherwise);
            None: any class but ``PreTrainedTokenizerFast``, and a config without ``model_input_names``.

    Returns:
        Whether the file was rewritten.
    """
    path = Path(folder) / "tokenizer_config.json"
    if not (path.is_file() and (path.parent / "tokenizer.json").is_file()):
        return False
    config = json.loads(path.read_text())
    current = config.get("tokenizer_class")
    if replace is not None:
        stale = current in replace
    else:
        stale = current != PORTABLE_TOKENIZER_CLASS or "model_input_names" not in config
    if not stale:
        return False
    config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    config.setdefault("model_input_names", list(input_names))
    write_atomic(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return True


def cache_kwarg(model: Any) -> str:
    """The KV-cache keyword of ``model.forward``: ``cache`` on transformers ≥ 5.24, ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def load_overrides(model_dir: Path) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained`` that make transformers 4.x read a 5.x config right.

    Empty on 5.x, and for configs that already carry the 4.x keys. (Nested text configs of VLMs are
    not covered: ``from_pretrained`` overrides top-level keys only.)
    """
    if TRANSFORMERS_MAJOR >= 5:
        return {}
    config = json.loads((Path(model_dir) / "config.json").read_text())
    portable = portable_config(config)
    return {k: v for k, v in portable.items() if k not in config}


@contextlib.contextmanager
def torchscript_patches() -> Iterator[None]:
    """Make transformers 4.53–4.57 traceable by the legacy (TorchScript) ONNX exporter; no-op on 5.x.

    Those releases build attention masks with ``torch.vmap`` and grow the KV cache by concatenating to
    an empty tensor, which TorchScript cannot trace ("unordered_map::at"). optimum-onnx ships vmap-free
    replacements for exactly this; they are swapped in for the duration of the trace and restored after.
    """
    if TRANSFORMERS_MAJOR >= 5:
        yield
        return
    from skipit.errors import BackendUnavailableError

    try:
        from optimum.exporters.onnx import model_patcher as mp
    except ImportError:
        raise BackendUnavailableError(
            f"the legacy (TorchScript) ONNX exporter needs optimum-onnx's mask patches on transformers "
            f"{metadata.version('transformers')}; install optimum-onnx or use the dynamo exporter (--exporter dynamo)"
        ) from None
    from transformers import masking_utils
    from transformers.cache_utils import DynamicLayer

    masks = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
    saved = (masks["sdpa"], masks["eager"], masking_utils.find_packed_sequence_indices, DynamicLayer.update)
    masks.register("sdpa", mp.sdpa_mask_without_vmap)
    masks.register("eager", mp.eager_mask_without_vmap)
    masking_utils.find_packed_sequence_indices = mp.find_packed_sequence_indices_patched
    DynamicLayer.update = mp.patched_dynamic_layer_update  # type: ignore[method-assign]  # undone below
    try:
        yield
    finally:
        masks.register("sdpa", saved[0])
        masks.register("eager", saved[1])
        masking_utils.find_packed_sequence_indices = saved[2]
        DynamicLayer.update = saved[3]  # type: ignore[method-assign]
