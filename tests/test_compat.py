"""Checkpoints cross the transformers 4.x / 5.x line without silently changing the model.

transformers 5.x saves RoPE settings only under ``rope_parameters``; 4.57 ignores that key and falls back
to theta 10000 without a word. These tests build a checkpoint the way 5.x writes it (theta 5000, which
changes the logits) and check that it loads right in the running transformers, that skipit's own saved
configs carry both spellings, and — in the 4.57 environment — that the optimum export of it matches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from skipit.compat import TRANSFORMERS_MAJOR, portable_config
from skipit.compressor.loading import load_model

THETA = 5000.0


@pytest.fixture
def llama_5x_style(tiny_model_dir, tmp_path: Path) -> Path:
    """The tiny Llama with its config in 5.x's spelling: RoPE theta only under rope_parameters."""
    ckpt = shutil.copytree(tiny_model_dir("LlamaForCausalLM"), tmp_path / "llama5")
    path = ckpt / "config.json"
    config = json.loads(path.read_text())
    for key in ("rope_theta", "rope_scaling"):
        config.pop(key, None)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": THETA}
    path.write_text(json.dumps(config))
    return ckpt


def _inv_freq_base(model) -> float:
    """The RoPE base the loaded model really uses, read back from its inverse frequencies."""
    inv_freq = model.model.rotary_emb.inv_freq
    dim = 2 * inv_freq.numel()
    return float(inv_freq[1] ** (-dim / 2))


def test_5x_config_loads_with_its_theta(llama_5x_style: Path) -> None:
    model = load_model(llama_5x_style).model
    assert _inv_freq_base(model) == pytest.approx(THETA, rel=1e-3)


def test_portable_config_spells_rope_both_ways() -> None:
    five = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0},
            "text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}}
    out = portable_config(five)
    assert out["rope_theta"] == 5e5 and out["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}
    assert out["rope_parameters"] == five["rope_parameters"]  # 5.x keeps reading its own key
    assert out["text_config"]["rope_theta"] == 1e6 and "rope_scaling" not in out["text_config"]
    gemma3 = {"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}}
    assert portable_config(gemma3) == {**gemma3, "rope_theta": 1e6, "rope_local_base_freq": 1e4}
    assert portable_config({"rope_theta": 3.0, "rope_parameters": {"rope_theta": 9.0}})["rope_theta"] == 3.0


def test_saved_slim_checkpoint_is_portable(llama_5x_style: Path, tmp_path: Path) -> None:
    from skipit.compressor.arch import decoder_spec
    from skipit.compressor.rewrite import remove_layers_, save_checkpoint

    loaded = load_model(llama_5x_style)
    remove_layers_(loaded.model, decoder_spec(loaded.model), [2])
    save_checkpoint(loaded.model, loaded.processor, loaded.model_dir, tmp_path / "slim")
    config = json.loads((tmp_path / "slim" / "config.json").read_text())
    assert config["rope_theta"] == THETA and config["num_hidden_layers"] == 5
    assert _inv_freq_base(load_model(tmp_path / "slim").model) == pytest.approx(THETA, rel=1e-3)


@pytest.mark.skipif(TRANSFORMERS_MAJOR >= 5, reason="optimum's exporter exists only with transformers<4.58 (make test-optimum)")
def test_optimum_export_of_a_5x_checkpoint_matches_torch(llama_5x_style: Path, tmp_path: Path) -> None:
    """Without the portable copy optimum would trace theta 10000; the export's own check against the
    torch model (theta 5000) would then fail."""
    from skipit.exporters.onnx import OnnxExportConfig, export_text_decoder
    from skipit.runtime.ort_text import OrtDecoderRunner

    graph = export_text_decoder(llama_5x_style, tmp_path / "onnx", OnnxExportConfig(backend="optimum"))
    ids = torch.tensor([[5, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150, 160, 170, 180]])
    with torch.inference_mode():
        ref = load_model(llama_5x_style).model(input_ids=ids).logits.numpy()
    logits, _ = OrtDecoderRunner(graph).forward(ids.numpy())
    assert abs(logits - ref).max() <= 1e-4


def test_make_tokenizer_portable_names_a_class_every_client_reads(tmp_path: Path) -> None:
    """One helper for the ONNX folder's copy (only 5.x's TokenizersBackend is replaced: a user's class is kept) and
    for a tokenizer skipit rebuilt itself (any class, and its own input names)."""
    from skipit.compat import make_tokenizer_portable

    (tmp_path / "tokenizer.json").write_text("{}")
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    assert make_tokenizer_portable(tmp_path, replace=("TokenizersBackend",))
    assert json.loads(config.read_text()) == {"tokenizer_class": "PreTrainedTokenizerFast",
                                              "model_input_names": ["input_ids", "attention_mask"]}
    config.write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    assert not make_tokenizer_portable(tmp_path, replace=("TokenizersBackend",))
    assert make_tokenizer_portable(tmp_path, ["input_ids"])
    assert json.loads(config.read_text())["model_input_names"] == ["input_ids"]
    assert not make_tokenizer_portable(tmp_path)  # already portable
    (tmp_path / "tokenizer.json").unlink()
    config.write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    assert not make_tokenizer_portable(tmp_path)  # no tokenizer.json: nothing PreTrainedTokenizerFast could load
