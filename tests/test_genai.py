"""onnxruntime-genai runs skipit's ONNX folder as exported: ``og.Model(out_dir)`` with the
``genai_config.json`` the text export writes, its tokenizer from the same folder, and greedy tokens equal
to torch's ``generate``. Two tiny checkpoints: a Llama (6 layers) and a slim Gemma-2 (sliding-window
layers, logit soft-capping, 2 of 6 layers removed by skipit's rewrite, so the config and graph have 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from skipit.errors import ExportError
from skipit.exporters.genai import GENAI_CONFIG, genai_config, genai_greedy
from skipit.exporters.onnx import OnnxExportConfig, export_text_decoder, kv_input_names, kv_output_names

NEW_TOKENS = 20
PROMPT = "skipit drops layers; the rest must still talk."  # 46 byte tokens > the sliding window of 8
IO = (["input_ids", "attention_mask", "position_ids", *kv_input_names(2)], ["logits", *kv_output_names(2)])
CONFIG = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,
          "vocab_size": 320, "max_position_embeddings": 512, "eos_token_id": 1, "model_type": "llama"}


@pytest.fixture(scope="module")
def exports(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """name → (checkpoint, ONNX folder)."""
    from skipit.compressor.arch import decoder_spec
    from skipit.compressor.rewrite import remove_layers_, save_checkpoint

    root = tmp_path_factory.mktemp("genai")
    gemma = tiny_model_dir("Gemma2ForCausalLM")
    model = transformers.AutoModelForCausalLM.from_pretrained(gemma, dtype=torch.float32).eval()
    remove_layers_(model, decoder_spec(model), [1, 2])
    save_checkpoint(model, transformers.AutoTokenizer.from_pretrained(gemma), gemma, root / "gemma2_slim")
    ckpts = {"llama": tiny_model_dir("LlamaForCausalLM"), "gemma2_slim": root / "gemma2_slim"}
    cfg = OnnxExportConfig(exporter="legacy")
    return {name: (ckpt, export_text_decoder(ckpt, root / f"{name}-onnx", cfg).parent.parent) for name, ckpt in ckpts.items()}


@pytest.mark.parametrize("name, layers, genai_type", [("llama", 6, "llama"), ("gemma2_slim", 4, "gemma2")])
def test_export_writes_genai_config_beside_the_tokenizer(exports, name, layers, genai_type) -> None:
    ckpt, out = exports[name]
    cfg = json.loads((out / GENAI_CONFIG).read_text())
    model, decoder = cfg["model"], cfg["model"]["decoder"]
    assert decoder["filename"] == "onnx/model.onnx" and (out / decoder["filename"]).is_file()
    assert (out / "tokenizer.json").is_file()
    assert model["type"] == genai_type
    assert decoder["num_hidden_layers"] == layers == json.loads((out / "config.json").read_text())["num_hidden_layers"]
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["head_size"], decoder["hidden_size"]) \
        == (4, 2, 16, 64)
    assert decoder["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                 "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                                 "past_value_names": "past_key_values.%d.value"}
    assert decoder["outputs"] == {"logits": "logits", "present_key_names": "present.%d.key",
                                  "present_value_names": "present.%d.value"}
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == \
        (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert (model["vocab_size"], model["context_length"]) == (320, 512)
    assert cfg["search"]["past_present_share_buffer"] is False and cfg["search"]["do_sample"] is False


@pytest.mark.parametrize("name", ["llama", "gemma2_slim"])
def test_onnxruntime_genai_generates_torch_greedy_tokens(exports, name) -> None:
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed: pip install 'skipit[test]'")
    ckpt, out = exports[name]
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    ids = tok(PROMPT, return_tensors="pt")
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = model.generate(**ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                  pad_token_id=tok.pad_token_id)[0].tolist()

    # the folder as exported: nothing added or edited
    assert list(og.Tokenizer(og.Model(str(out))).encode(PROMPT)) == ids["input_ids"][0].tolist()
    got = genai_greedy(out, ids["input_ids"][0].tolist(), NEW_TOKENS)
    assert got == expected, f"onnxruntime-genai greedy tokens differ from torch: {got} vs {expected}"


def test_export_without_eos_id_still_exports_and_says_why_genai_config_is_missing(exports, tmp_path, caplog) -> None:
    from skipit.exporters.genai import write_genai_config

    _, out = exports["llama"]
    folder = tmp_path / "copy"
    (folder / "onnx").mkdir(parents=True)
    (folder / "onnx" / "model.onnx").write_bytes((out / "onnx" / "model.onnx").read_bytes())
    config = json.loads((out / "config.json").read_text())
    del config["eos_token_id"]
    (folder / "config.json").write_text(json.dumps(config))
    assert write_genai_config(folder, strict=False) is None
    assert not (folder / GENAI_CONFIG).exists() and "no genai_config.json written" in caplog.text
    with pytest.raises(ExportError, match="eos_token_id"):
        write_genai_config(folder)


def test_genai_config_refuses_graphs_it_cannot_describe() -> None:
    config = genai_config(CONFIG, {}, *IO)
    assert config["model"]["pad_token_id"] == 1 and "bos_token_id" not in config["model"]
    assert genai_config(dict(CONFIG, model_type="brand_new"), {}, *IO)["model"]["type"] == "decoder"
    assert genai_config(CONFIG, {"eos_token_id": [1, 7], "do_sample": True}, *IO)["model"]["eos_token_id"] == [1, 7]
    with pytest.raises(ExportError, match="config.json says 3 layers but the graph has past KV for 2"):
        genai_config(dict(CONFIG, num_hidden_layers=3), {}, *IO)
    with pytest.raises(ExportError, match="names an eos_token_id"):
        genai_config({k: v for k, v in CONFIG.items() if k != "eos_token_id"}, {}, *IO)
    with pytest.raises(ExportError, match="not a merged decoder"):
        genai_config(CONFIG, {}, ["inputs_embeds", *IO[0][1:]], IO[1])
