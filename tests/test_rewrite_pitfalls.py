"""Each known way to break a layer removal is caught by skipit's checks (pitfalls.md, "what breaks")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import tiny_models

from skipit.compressor.arch import decoder_spec
from skipit.compressor.loading import load_model
from skipit.compressor.rewrite import (HALF_MAX_MEAN_REL, HALF_MIN_TOP1, check_in_memory, logit_agreement, remove_layers_,
                                      save_checkpoint, verify_reload)
from skipit.errors import RewriteError

QWEN2 = "Qwen2ForCausalLM"  # has heterogeneous layer_types
INPUTS = {"input_ids": torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])}


def _load(tiny_model_dir, arch: str = QWEN2):
    loaded = load_model(tiny_model_dir(arch))
    return loaded, decoder_spec(loaded.model)


def test_correct_removal_passes_every_check(tiny_model_dir, tmp_path: Path) -> None:
    loaded, spec = _load(tiny_model_dir)
    diff = remove_layers_(loaded.model, spec, [1, 3])
    assert diff["num_hidden_layers"] == {"before": 6, "after": 4}
    assert diff["layer_types"]["after"] == [tiny_models.LAYER_TYPES[i] for i in (0, 2, 4, 5)]
    save_checkpoint(loaded.model, loaded.processor, loaded.model_dir, tmp_path / "m")
    facts = verify_reload(tmp_path / "m", loaded.model, spec, INPUTS)
    assert facts["num_hidden_layers"] == 4 and facts["max_abs_logit_error"] <= 1e-4


def test_stale_layer_types_is_caught(tiny_model_dir, tmp_path: Path) -> None:
    loaded, spec = _load(tiny_model_dir)
    cfg = spec.text_config
    stale = list(cfg.layer_types)
    spec.keep_layers_([0, 2, 4, 5])
    cfg.layer_types = stale  # the pitfall: per-layer list not sliced
    with pytest.raises(RewriteError, match="stale per-layer list"):
        check_in_memory(loaded.model, spec)
    # transformers 5.x itself refuses to save such a config; a checkpoint written by another tool
    # (config.json edited by hand) must still be caught by the reload check
    cfg.layer_types = [stale[i] for i in (0, 2, 4, 5)]
    loaded.model.save_pretrained(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    written = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**written, "layer_types": stale}))
    with pytest.raises(RewriteError, match="does not reload"):
        verify_reload(tmp_path / "m", loaded.model, spec, INPUTS)


def test_unrenumbered_layer_idx_is_caught(tiny_model_dir) -> None:
    loaded, spec = _load(tiny_model_dir)
    spec.keep_layers_([0, 2, 4, 5])
    for original, layer in zip([0, 2, 4, 5], spec.layers):
        layer.self_attn.layer_idx = original  # the pitfall: indices left as they were
    with pytest.raises(RewriteError, match="layer_idx"):
        check_in_memory(loaded.model, spec)


def test_modulelist_only_deletion_is_caught_after_reload(tiny_model_dir, tmp_path: Path) -> None:
    """Deleting modules without updating the config reloads as 6 layers, 2 of them random."""
    loaded, spec = _load(tiny_model_dir, "LlamaForCausalLM")
    layers = spec.layers
    del layers[4]
    del layers[2]
    with pytest.raises(RewriteError):
        check_in_memory(loaded.model, spec)
    loaded.model.save_pretrained(tmp_path / "m")
    with pytest.raises(RewriteError):
        verify_reload(tmp_path / "m", loaded.model, spec, INPUTS)


def test_tied_embeddings_stay_tied(tiny_model_dir, tmp_path: Path) -> None:
    loaded, spec = _load(tiny_model_dir, "LlamaForCausalLM")
    assert loaded.model.config.tie_word_embeddings
    remove_layers_(loaded.model, spec, [2])
    save_checkpoint(loaded.model, loaded.processor, loaded.model_dir, tmp_path / "m")
    facts = verify_reload(tmp_path / "m", loaded.model, spec, INPUTS)
    assert facts["tied"] is True


def test_skipping_restores_the_model(tiny_model_dir) -> None:
    loaded, spec = _load(tiny_model_dir)
    with torch.inference_mode():
        before = loaded.model(**INPUTS, use_cache=False).logits
        with spec.skipping([2, 3]):
            assert spec.num_layers == 4 and spec.original_indices == [0, 1, 4, 5]
            during = loaded.model(**INPUTS, use_cache=False).logits
        after = loaded.model(**INPUTS, use_cache=False).logits
    assert not torch.allclose(before, during)
    assert torch.equal(before, after)
    assert spec.text_config.layer_types == tiny_models.LAYER_TYPES
    check_in_memory(loaded.model, spec)


def test_half_precision_rounding_passes_and_a_missing_layer_does_not(tiny_model_dir) -> None:
    """16-bit logits differ across thread splits (verify_reload tolerates that); a layer more or less is not that."""
    loaded, spec = _load(tiny_model_dir, "LlamaForCausalLM")
    model = loaded.model.to(torch.bfloat16)
    inputs = {"input_ids": torch.randint(3, 200, (4, 48), generator=torch.Generator().manual_seed(0))}
    threads = torch.get_num_threads()

    def logits() -> torch.Tensor:
        with torch.inference_mode():
            return model(**inputs, use_cache=False).logits

    try:
        torch.set_num_threads(1)
        one = logits()
    finally:
        torch.set_num_threads(threads)
    full = logits()
    same = logit_agreement(one, full, None)
    assert same["top1_agreement"] >= HALF_MIN_TOP1 and same["mean_rel_logit_error"] <= HALF_MAX_MEAN_REL
    del spec.layers[3]
    missing = logit_agreement(logits(), full, None)
    assert missing["top1_agreement"] < HALF_MIN_TOP1 or missing["mean_rel_logit_error"] > HALF_MAX_MEAN_REL
