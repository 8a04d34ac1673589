"""End to end on a tiny model of every registered architecture: analyze → certify → rewrite →
reload in a fresh process with plain transformers → generate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models

from skipit.compressor.arch import REGISTRY
from skipit.compressor.certificate import CertifyPolicy
from skipit.pipeline import CompressOptions, DataOptions, compress

FRESH_PROCESS_GENERATE = """
import json, sys, torch, transformers
d = sys.argv[1]
cfg = transformers.AutoConfig.from_pretrained(d)
auto = transformers.AutoModelForImageTextToText if cfg.get_text_config(decoder=True) is not cfg else transformers.AutoModelForCausalLM
m = auto.from_pretrained(d).eval()
ids = torch.tensor([[5, 6, 7, 8]])
out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, do_sample=False)
print(json.dumps({"layers": cfg.get_text_config(decoder=True).num_hidden_layers, "new": out.shape[1] - 4,
                  "skipit_imported": "skipit" in sys.modules}))
"""


def test_every_registered_architecture_has_a_tiny_model() -> None:
    missing = sorted(set(REGISTRY) - set(tiny_models.ARCHITECTURES))
    assert not missing, f"registered specs without a tiny test model: {missing}"


@pytest.mark.parametrize("arch", sorted(tiny_models.ARCHITECTURES))
def test_compress_reload_generate(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir(arch)
    before = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    options = CompressOptions(
        data=DataOptions(limit=18, batch_size=4, max_length=48),
        policy=CertifyPolicy(max_kl=None, max_layers=2),
    )
    result = compress(src, tmp_path / "out", options)
    cert = result.certificate
    assert len(cert.layers) == 2 and cert.n_layers == len(tiny_models.LAYER_TYPES)
    assert 0 not in cert.layers and cert.n_layers - 1 not in cert.layers, "protected layers were removed"
    # one base pass, then per removed layer verify_top candidate sets verified on the whole split (plus the next
    # one where the screen ties it, and at most one confirmed swap), after at most probe_width + 1 (block) +
    # swap_width screens on part of it
    # (SLEB: ~L full passes per removed layer)
    policy = CertifyPolicy(max_kl=None, max_layers=2)
    k = len(cert.layers)
    swaps = sum(s.kind == "swap" for s in cert.steps)
    tied = cert.passes["tie_verified"]
    assert swaps <= k - 1 and 0 <= tied <= k
    assert cert.passes["calibration"] == 1 + policy.verify_top * k + tied + swaps
    assert cert.passes["screen"] <= (policy.probe_width + 1 + policy.swap_width) * k
    frac = cert.passes["screen_samples"] / cert.passes["calibration_samples"]
    assert 0 < frac < 1, "screening must use part of the calibration samples"
    assert cert.passes["calibration_equivalent"] == pytest.approx(cert.passes["calibration"] + cert.passes["screen"] * frac)
    assert cert.holdout["kl"]["hi"] >= cert.holdout["kl"]["mean"] >= 0
    manifest = json.loads((result.out_dir / "skipit_manifest.json").read_text())
    assert manifest["layers"]["removed"] == cert.layers
    assert manifest["layers"]["slim"] == cert.n_layers - 2
    assert manifest["versions"]["transformers"]
    assert manifest["reload_check"]["max_abs_logit_error"] <= 1e-4
    text_cfg = json.loads((result.out_dir / "model" / "config.json").read_text())
    text_cfg = text_cfg.get("text_config", text_cfg)
    assert text_cfg["num_hidden_layers"] == cert.n_layers - 2
    if "layer_types" in text_cfg:  # sliced to the kept layers, in order
        kept = manifest["layers"]["kept"]
        assert text_cfg["layer_types"] == [tiny_models.LAYER_TYPES[i] for i in kept]
    assert "removed" in (result.out_dir / "README.md").read_text()
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS_GENERATE, str(result.out_dir / "model")],
                          capture_output=True, text=True, check=True)
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts == {"layers": cert.n_layers - 2, "new": 4, "skipit_imported": False}
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()} == before, "input dir was modified"
