"""Remove layers for good, save a plain Hugging Face checkpoint, and prove it reloads.

A removal that only edits the ModuleList works in memory and silently breaks after save + reload (the
old layer count comes back with random weights), so the spec updates config and layer indices as one
operation, and :func:`verify_reload` reloads the saved checkpoint in a fresh process (no skipit import)
and compares its logits with the in-memory slim model.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

from skipit.compat import make_config_portable, make_tokenizer_portable
from skipit.errors import RewriteError

log = logging.getLogger(__name__)

_CONFIG_KEYS = ("num_hidden_layers", "layer_types", "max_window_layers")
#: Shard size of a checkpoint saved from a model with offloaded weights (each shard is materialised in RAM).
OFFLOADED_SHARD_SIZE = "2GB"


def _config_view(spec: Any) -> dict[str, Any]:
    return {k: getattr(spec.text_config, k) for k in _CONFIG_KEYS if k in spec.text_config.__dict__}


def remove_layers_(model: Any, spec: Any, layers: Sequence[int]) -> dict[str, Any]:
    """Remove ``layers`` (original numbering) from ``model`` in place; return the config diff."""
    before = _config_view(spec)
    removed = set(layers)
    unknown = removed - set(spec.original_indices)
    if unknown:
        raise RewriteError(f"layers {sorted(unknown)} are not in the model (it has {spec.original_indices})")
    spec.keep_layers_([p for p, o in enumerate(spec.original_indices) if o not in removed])
    after = _config_view(spec)
    check_in_memory(model, spec)
    return {k: {"before": before[k], "after": after.get(k)} for k in before if before[k] != after.get(k)}


def check_in_memory(model: Any, spec: Any) -> None:
    """Check that the layer list, config and layer indices agree, and that a cached forward runs."""
    import torch

    n = spec.num_layers
    cfg = spec.text_config
    if cfg.num_hidden_layers != n:
        raise RewriteError(f"config says {cfg.num_hidden_layers} layers but the model holds {n}")
    for key in spec.arch.per_layer_lists:
        value = getattr(cfg, key, None)
        if isinstance(value, (list, tuple)) and len(value) != n:
            raise RewriteError(f"config.{key} has {len(value)} entries for {n} layers (stale per-layer list)")
    for pos, layer in enumerate(spec.layers):
        for module in layer.modules():
            idx = getattr(module, "layer_idx", None)
            if isinstance(idx, int) and idx != pos:
                raise RewriteError(f"layer at position {pos} still has layer_idx={idx}; the KV cache would index the wrong layer")
    from skipit.compressor.placement import input_device

    ids = torch.tensor([[1, 2, 3]], device=input_device(model))
    try:
        with torch.inference_mode():  # generate() exercises the KV cache, which indexes by layer_idx
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2,
                           do_sample=False, use_cache=True, pad_token_id=0)
    except (IndexError, RuntimeError, ValueError) as exc:
        raise RewriteError(f"a cached forward of the slim model fails: {exc}") from None


def save_checkpoint(model: Any, processor: Any, source_dir: Path | None, out_dir: Path) -> None:
    """Save ``model`` as safetensors plus tokenizer/processor files into ``out_dir``.

    Files from the source directory are copied verbatim where possible (they are the user's own);
    otherwise (GGUF input) the processor is saved, with a tokenizer class every client reads.
    """
    from skipit.compressor.loading import PROCESSOR_FILE_PATTERNS

    out_dir.mkdir(parents=True, exist_ok=True)
    shards = {}
    if any(p.device.type == "meta" for p in model.parameters()):
        # offloaded weights are read back shard by shard (transformers' default shard is 50 GB, held in RAM)
        shards = {"max_shard_size": OFFLOADED_SHARD_SIZE}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        try:
            model.save_pretrained(out_dir, safe_serialization=True, **shards)
        except AttributeError:
            if not shards:
                raise
            # transformers 4.x looks offloaded (meta) tensors up under their *saved* names, which differ from the
            # module names in models with a checkpoint conversion mapping (LLaVA …): read them all back first
            from accelerate.utils.modeling import get_state_dict_offloaded_model

            log.warning("saving through a state dict read back from the offloaded weights (transformers %s cannot "
                        "save this offloaded model directly); it holds the whole model in memory once",
                        _transformers_version())
            model.save_pretrained(out_dir, safe_serialization=True, state_dict=get_state_dict_offloaded_model(model),
                                  **shards)
    make_config_portable(out_dir)  # RoPE settings readable by transformers 4.x too (optimum's environment)
    copied = []
    if source_dir is not None:
        for pattern in PROCESSOR_FILE_PATTERNS:
            for path in source_dir.glob(pattern):
                if path.is_file():
                    shutil.copy2(path, out_dir / path.name)
                    copied.append(path.name)
    if not copied:
        processor.save_pretrained(out_dir)
        # a tokenizer skipit rebuilt (from GGUF metadata) is a plain tokenizer.json, whatever class transformers names
        make_tokenizer_portable(out_dir, list(getattr(processor, "model_input_names", ["input_ids", "attention_mask"])))


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _die_with_parent() -> None:
    """In the child (Linux): receive SIGKILL when the parent dies, even by SIGKILL, so no orphan runs on."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    except (OSError, AttributeError):
        pass


#: A 16-bit checkpoint's logits are not bit-reproducible across processes: the CPU's bf16 kernels round
#: differently with another thread split or code path. Measured on SmolLM2-135M in bfloat16, 2 threads vs 1:
#: max |Δlogit| 0.75, mean |Δ| 1.5 % of mean |logit|, top-1 agreement 1.0 — while one layer more or less
#: gives 24 % / 0.84 (layer 17) and 190 % / 0.54 (layer 29). So for 16-bit dtypes a max error above ``atol``
#: passes when the top-1 agreement and the mean relative error (at attended positions) stay within these.
HALF_DTYPES = ("bfloat16", "float16")
HALF_MIN_TOP1 = 0.95
HALF_MAX_MEAN_REL = 0.05


def logit_agreement(got: Any, expected: Any, mask: Any | None) -> dict[str, float]:
    """Top-1 agreement and mean |Δlogit| / mean |logit| of two [batch, seq, vocab] logits (at ``mask`` positions)."""
    got, expected = got.float(), expected.float()
    if mask is not None and tuple(mask.shape) == tuple(got.shape[:2]):
        got, expected = got[mask], expected[mask]
    top1 = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
    rel = float((got - expected).abs().mean() / expected.abs().mean().clamp_min(1e-12))
    return {"top1_agreement": top1, "mean_rel_logit_error": rel}


def verify_reload(model_dir: Path, model: Any, spec: Any, inputs: dict[str, Any], *, atol: float = 1e-4) -> dict[str, Any]:
    """Reload ``model_dir`` in a fresh process and compare its logits with ``model``'s on ``inputs``."""
    import torch
    from safetensors.torch import load_file, save_file

    script = Path(__file__).with_name("reload_check.py")
    tensors = {k: v.detach().cpu().contiguous() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    with tempfile.TemporaryDirectory(prefix="skipit-reload-") as tmp:
        in_path, out_path = Path(tmp) / "inputs.safetensors", Path(tmp) / "out.safetensors"
        save_file(tensors, str(in_path))
        proc = subprocess.run(  # on an exception here (Ctrl-C, SIGTERM) subprocess.run kills the child
            [sys.executable, str(script), str(model_dir), str(in_path), str(out_path)],
            capture_output=True, text=True, check=False,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise RewriteError(f"the saved checkpoint {model_dir} does not reload in a fresh process: {tail[0]}")
        result = load_file(str(out_path))
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    from skipit.compressor.placement import input_device

    with torch.inference_mode():
        device = input_device(model)
        expected = model(**{k: v.to(device) for k, v in tensors.items()}, use_cache=False).logits.float().cpu()
    err = float((result["logits"].float() - expected).abs().max())
    facts["max_abs_logit_error"] = err
    mask = tensors.get("attention_mask")
    facts.update(logit_agreement(result["logits"], expected, None if mask is None else mask.bool()))
    layer_types = facts["layer_types"]
    if facts["num_hidden_layers"] != spec.num_layers or (layer_types is not None and len(layer_types) != spec.num_layers):
        raise RewriteError(f"the reloaded config disagrees with the slim model's {spec.num_layers} layers: {facts}")
    if err > atol:
        if not (facts["dtype"] in HALF_DTYPES and facts["top1_agreement"] >= HALF_MIN_TOP1
                and facts["mean_rel_logit_error"] <= HALF_MAX_MEAN_REL):
            raise RewriteError(f"the reloaded checkpoint's logits differ from the slim model's by {err:.3g} (> {atol}); "
                               "the rewrite is broken")
        log.info("reload check: max |Δlogit| %.3g in %s is rounding (top-1 agreement %.3f, mean relative error %.3g)",
                 err, facts["dtype"], facts["top1_agreement"], facts["mean_rel_logit_error"])
    if facts["tie_word_embeddings"] and not facts["tied"]:
        raise RewriteError("tie_word_embeddings is set but the reloaded LM head is not tied to the embeddings")
    return facts
