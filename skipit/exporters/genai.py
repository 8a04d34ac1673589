"""``genai_config.json`` for an exported text decoder, so that onnxruntime-genai runs it untouched.

onnxruntime-genai (``og.Model(folder)``) reads ``folder/genai_config.json``, opens the decoder graph at
``model.decoder.filename`` *relative to that folder*, and ``og.Tokenizer`` reads ``tokenizer.json`` /
``tokenizer_config.json`` from the same folder. skipit's ONNX folder keeps the tokenizer beside
``config.json`` and the graph in ``onnx/model.onnx`` (the layout optimum and transformers.js load), so the
config goes at the folder's root and names ``onnx/model.onnx`` (measured with onnxruntime-genai 0.18: a
config inside ``onnx/`` loads the graph but finds no tokenizer).

The values follow onnxruntime-genai's own model builder (``make_genai_config``): sizes from
``config.json``, special tokens from ``generation_config.json`` first, search defaults from
``generation_config.json``, the graph's real input and output names (read from the graph, so an optimum
export is described as faithfully as skipit's), and ``search.past_present_share_buffer: false``:
skipit's graphs take the past and return past + new tokens (concatenation), not a preallocated buffer.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from skipit.atomic import write_atomic
from skipit.errors import ExportError
from skipit.exporters.onnx.convention import MODEL_FILE, ONNX_SUBDIR, PRESENT_NAME_RE, kv_layers

log = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
DEFAULT_DECODER_FILE = f"{ONNX_SUBDIR}/{MODEL_FILE}"
# model.type values onnxruntime-genai 0.18 accepts that name a Hugging Face model_type as is; any other
# text decoder runs as genai's generic "decoder" (measured: the same tokens for a Llama graph either way).
_GENAI_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                          "granite", "olmo", "smollm3"})
_DEFAULT_CONTEXT = 4096


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _graph_io(graph: Path) -> tuple[list[str], list[str]]:
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def genai_config(model_config: dict[str, Any], generation_config: dict[str, Any], inputs: list[str],
                 outputs: list[str], decoder_file: str = DEFAULT_DECODER_FILE) -> dict[str, Any]:
    """The genai_config dict for a merged decoder graph with ``inputs`` / ``outputs`` (graph names).

    Args:
        model_config: ``config.json`` of the exported (slim) checkpoint; a VLM's ``text_config`` is used
            when present.
        generation_config: ``generation_config.json`` (may be empty).
        inputs, outputs: the graph's input and output names, in any order.
        decoder_file: the graph's path relative to the folder holding genai_config.json.

    Raises:
        ExportError: the graph's KV inputs do not match ``num_hidden_layers``, or it is not a merged
            decoder with ``input_ids`` and ``logits``.
    """
    cfg = model_config.get("text_config") or model_config
    gen = generation_config
    n_layers = int(cfg["num_hidden_layers"])
    past_layers = kv_layers(inputs)
    present_layers = sorted({int(m.group(1)) for n in outputs if (m := PRESENT_NAME_RE.fullmatch(n))})
    if "input_ids" not in inputs or "logits" not in outputs:
        raise ExportError(f"the graph is not a merged decoder (inputs {inputs[:4]}…, outputs {outputs[:3]}…); "
                          "genai_config.json describes graphs with input_ids → logits")
    if past_layers != list(range(n_layers)) or present_layers != past_layers:
        raise ExportError(f"config.json says {n_layers} layers but the graph has past KV for {len(past_layers)} and "
                          f"present KV for {len(present_layers)} layers; export the slim checkpoint again")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_size = int(cfg.get("head_dim") or hidden // heads)
    context = _first(cfg.get("max_position_embeddings"), cfg.get("n_positions"), cfg.get("max_sequence_length"))
    if context is None:
        log.warning("config.json states no context length; genai_config.json says %d", _DEFAULT_CONTEXT)
        context = _DEFAULT_CONTEXT
    eos = _first(gen.get("eos_token_id"), cfg.get("eos_token_id"), model_config.get("eos_token_id"))
    if eos is None:
        raise ExportError("neither generation_config.json nor config.json names an eos_token_id; genai needs one "
                          "to stop generating: add it to the checkpoint's generation_config.json")
    pad = _first(gen.get("pad_token_id"), cfg.get("pad_token_id"), eos[0] if isinstance(eos, list) else eos)
    bos = _first(gen.get("bos_token_id"), cfg.get("bos_token_id"), model_config.get("bos_token_id"))
    model_type = cfg.get("model_type") or model_config.get("model_type") or "decoder"

    graph_inputs: dict[str, str] = {name: name for name in ("input_ids", "attention_mask", "position_ids") if name in inputs}
    graph_inputs.update({"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"})
    model: dict[str, Any] = {
        "bos_token_id": bos,
        "context_length": int(context),
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": decoder_file,
            "head_size": head_size,
            "hidden_size": hidden,
            "inputs": graph_inputs,
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"},
            "num_attention_heads": heads,
            "num_hidden_layers": n_layers,
            "num_key_value_heads": int(cfg.get("num_key_value_heads") or heads),
        },
        "eos_token_id": eos,
        "pad_token_id": pad,
        "type": model_type if model_type in _GENAI_TYPES else "decoder",
        "vocab_size": int(cfg["vocab_size"]),
    }
    if bos is None:
        del model["bos_token_id"]
    search = {
        "diversity_penalty": 0.0,
        "do_sample": bool(gen.get("do_sample", False)),
        "early_stopping": True,
        "length_penalty": float(gen.get("length_penalty", 1.0)),
        "max_length": int(context),
        "min_length": 0,
        "no_repeat_ngram_size": int(gen.get("no_repeat_ngram_size", 0)),
        "num_beams": int(gen.get("num_beams", 1)),
        "num_return_sequences": 1,
        "past_present_share_buffer": False,  # concat-style KV: present = past + new tokens
        "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
        "temperature": float(gen.get("temperature", 1.0)),
        "top_k": int(gen.get("top_k") or 50),
        "top_p": float(gen.get("top_p") or 1.0),
    }
    return {"model": model, "search": search}


def write_genai_config(folder: str | os.PathLike, decoder_file: str = DEFAULT_DECODER_FILE, *,
                       strict: bool = True) -> Path | None:
    """Write ``folder/genai_config.json`` for the graph ``folder/decoder_file``, from the ``config.json`` and
    ``generation_config.json`` in ``folder`` (an ONNX export folder); return its path.

    With ``strict=False`` (what the ONNX export uses: the graph is fine without it), a checkpoint that
    genai_config.json cannot describe (no EOS id, …) gets a warning and no file, and None is returned.
    """
    if not strict:
        try:
            return write_genai_config(folder, decoder_file)
        except ExportError as exc:
            log.warning("no %s written, so onnxruntime-genai will not load this folder as is: %s", GENAI_CONFIG, exc)
            return None
    folder = Path(folder)
    graph = folder / decoder_file
    if not graph.is_file():
        raise ExportError(f"{graph} does not exist: export the decoder before writing {GENAI_CONFIG}")
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder} has no config.json; {GENAI_CONFIG} is built from it")
    inputs, outputs = _graph_io(graph)
    config = genai_config(_read_json(folder / "config.json"), _read_json(folder / "generation_config.json"),
                          inputs, outputs, decoder_file)
    path = folder / GENAI_CONFIG
    write_atomic(path, json.dumps(config, indent=2) + "\n")
    log.info("wrote %s (onnxruntime-genai type %r, %d layers)", path, config["model"]["type"],
             config["model"]["decoder"]["num_hidden_layers"])
    return path


def genai_greedy(folder: str | os.PathLike, input_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Prompt + greedy tokens from onnxruntime-genai running ``folder`` as it is (``og.Model(folder)``).

    Exactly ``max_new_tokens`` are generated (EOS does not stop early), to compare with transformers'
    ``generate(..., min_new_tokens=max_new_tokens, max_new_tokens=max_new_tokens, do_sample=False)``.

    Raises:
        BackendUnavailableError: onnxruntime-genai is not installed.
    """
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        from skipit.errors import BackendUnavailableError

        raise BackendUnavailableError("onnxruntime-genai is not installed: pip install onnxruntime-genai") from exc
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    total = len(input_ids) + max_new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([int(t) for t in input_ids])
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


__all__ = ["GENAI_CONFIG", "genai_config", "genai_greedy", "write_genai_config"]
