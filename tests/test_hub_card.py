"""The card in model/: Hub metadata (base_model, library_name, pipeline_tag, license, tags) read back by
a YAML parser, license and Hub id taken from what the source carries (card, config, GGUF metadata)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from skipit.compressor.manifest import front_matter, hub_model_card, model_card, source_card_metadata

MANIFEST = {
    "source": {"path": "/models/SmolLM2-135M-Instruct.Q4_1.gguf", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    "architecture": "LlamaForCausalLM",
    "layers": {"original": 30, "slim": 28, "removed": [16, 17], "kept": [], "removal_order": [17, 16]},
    "certificate": {
        "statement": "Removing layers [16, 17] of 30: mean KL 0.1 nats/token.",
        "holdout": {"kl": {"mean": 0.1, "hi": 0.12, "n": 40}, "top1": {"mean": 0.9, "lo": 0.88}, "tokens": 2000},
        "policy": {"max_kl": 0.35, "confidence": 0.95},
        "passes": {"calibration": 12, "holdout": 3},
    },
    "calibration": {"description": "built-in English text"},
    "versions": {"skipit": "0.1.0", "transformers": "5.24.0", "torch": "2.13.0"},
}


def test_card_front_matter_is_hub_metadata() -> None:
    card = hub_model_card(MANIFEST, pipeline_tag="text-generation",
                          metadata={"license": "apache-2.0", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    meta = front_matter(card)
    assert meta == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "library_name": "transformers",
                    "pipeline_tag": "text-generation", "license": "apache-2.0",
                    "tags": ["skipit", "layer-pruning", "pruned"]}
    assert "# HuggingFaceTB/SmolLM2-135M-Instruct with 2 of 30 decoder layers removed" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "| decoder layers | 30 → 28 |" in card
    assert "weights are the original's" in card


def test_unknown_hub_id_is_left_out_and_vlms_get_their_pipeline() -> None:
    manifest = dict(MANIFEST, certificate=dict(MANIFEST["certificate"], healing={"steps": 10}))
    card = hub_model_card(manifest, pipeline_tag="image-text-to-text", base_model="org/vlm")
    meta = front_matter(card)
    assert meta["base_model"] == "org/vlm" and meta["pipeline_tag"] == "image-text-to-text"
    assert "license" not in meta and "AutoModelForImageTextToText" in card and "healed" in card
    assert "base_model" not in front_matter(hub_model_card(MANIFEST, pipeline_tag="text-generation"))


def test_output_dir_card_is_unchanged_by_the_refactor() -> None:
    card = model_card(MANIFEST)
    assert front_matter(card) == {"tags": ["skipit", "layer-pruning"]}
    assert "| removed (original numbering) | 16, 17 |" in card and "skipit_manifest.json" in card


def test_license_from_source_card_and_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"license": "mit"}))
    assert source_card_metadata(tmp_path) == {"license": "mit"}
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: llama3\nlicense_link: LICENSE\n"
                                        "language: [en]\n---\n# A model\n")
    assert source_card_metadata(tmp_path) == {"license": "other", "license_name": "llama3", "license_link": "LICENSE"}
    (tmp_path / "README.md").write_text("# no front matter\n---\nlicense: nope\n---\n")
    assert source_card_metadata(tmp_path) == {"license": "mit"}


def test_license_and_source_repo_from_gguf(tmp_path: Path, smollm2_gguf: Path) -> None:
    gguf = pytest.importorskip("gguf")
    assert source_card_metadata(smollm2_gguf) == {"license": "apache-2.0"}  # SmolLM2's GGUF names no source repo
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_string("general.license", "mit")
    w.add_string("general.source.url", "https://huggingface.co/org/model-7b")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert source_card_metadata(path) == {"license": "mit", "base_model": "org/model-7b"}
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:140])  # header 24 + architecture 45 + license 38 bytes: the URL is cut
    assert source_card_metadata(cut) == {"license": "mit"}
