"""A certificate that survives a change of text (issue 11, part 3): per-domain and per-position held-out
figures, the worst domain's bound certified by default, the longest context covered, a warning from the
gate on longer data; and a split that adapts to small files (stratified by domain, a calibration floor)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from skipit.compressor.calibration import MIN_CALIBRATION, load_calibration
from skipit.compressor.certificate import CertifyPolicy
from skipit.errors import CalibrationDataError
from skipit.pipeline import CompressOptions, DataOptions, compress

LLAMA = "LlamaForCausalLM"
DOMAINS = {"weather": "The wind over the harbour turned {i} times before the rain came in from the west.",
           "numbers": "{i} plus {i} makes {j}; twelve times {i} is written down in the ledger as a sum.",
           "recipes": "Stir {i} spoons of flour into the warm milk and let the dough rest for {j} minutes."}


def _write(path: Path, per_domain: int, **extra: Any) -> Path:
    lines = [json.dumps({"text": t.format(i=i, j=2 * i), "domain": d, **extra})
             for i in range(per_domain) for d, t in DOMAINS.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_small_files_get_a_calibration_floor_and_a_stratified_split(tmp_path: Path) -> None:
    data = load_calibration(_write(tmp_path / "d.jsonl", 11))  # 33 texts
    sizes = data.describe()["split_sizes"]
    assert sizes["calibration"] == min(MIN_CALIBRATION, 33 // 3) == 11 > round(0.2 * 33)
    for split in ("calibration", "holdout", "test"):
        per_domain = data.describe()["domains"][split]
        assert set(per_domain) == set(DOMAINS) and max(per_domain.values()) - min(per_domain.values()) <= 1, per_domain
    assert "stratified" in data.describe()["split_rule"]
    big = load_calibration(None).describe()["split_sizes"]
    assert big == {"calibration": 53, "holdout": 106, "test": 107}  # 20 / 40 / 40 when the data is large


def test_a_domain_field_must_be_a_string(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"text {i}", "domain": 3}) for i in range(8)))
    with pytest.raises(CalibrationDataError, match='"domain" must be a non-empty string'):
        load_calibration(path)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("domains")
    calib = _write(root / "calib.jsonl", 12)
    out = {}
    for bound in ("worst-domain", "pooled"):
        options = CompressOptions(data=DataOptions(path=calib, batch_size=6, max_length=16),
                                  policy=CertifyPolicy(max_kl=None, max_layers=1, probe_width=1, bound=bound))
        out[bound] = compress(tiny_model_dir(LLAMA), root / bound, options)
    out["calib"] = calib
    return out


def test_the_worst_domain_is_certified_by_default(runs: dict[str, Any]) -> None:
    cert = runs["worst-domain"].certificate
    hold = cert.holdout
    assert set(hold["domains"]) == set(DOMAINS)
    worst = max(hold["domains"], key=lambda d: hold["domains"][d]["kl"]["hi"])
    assert hold["bound"] == {"kind": "worst-domain", "domain": worst, "kl_hi": hold["domains"][worst]["kl"]["hi"],
                             "top1_lo": min(f["top1"]["lo"] for f in hold["domains"].values())}
    assert cert.kl_bound == hold["bound"]["kl_hi"] and f"worst domain ({worst})" in cert.statement()
    assert sum(f["samples"] for f in hold["domains"].values()) == hold["kl"]["n"]
    pooled = runs["pooled"].certificate
    assert pooled.holdout["bound"]["kind"] == "pooled" and pooled.kl_bound == pooled.holdout["kl"]["hi"]


def test_positions_and_the_longest_context_are_reported(runs: dict[str, Any]) -> None:
    hold = runs["worst-domain"].certificate.holdout
    assert list(hold["positions"]) == ["1-64"] and hold["positions"]["1-64"]["tokens"] == hold["tokens"]
    assert hold["longest_context"] == 16  # --max-length 16 cut every text
    card = (runs["worst-domain"].out_dir / "README.md").read_text()
    assert "contexts up to 16 tokens" in card and "| weather |" in card and "| 1-64 |" in card


def test_the_gate_warns_about_data_longer_than_the_certified_context(runs: dict[str, Any], tiny_model_dir,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    from skipit.validators.gate import GateConfig, validate
    from skipit.validators.parity import ParityConfig

    config = GateConfig(parity=ParityConfig(max_length=48, new_tokens=0))
    report = validate(tiny_model_dir(LLAMA), runs["worst-domain"].out_dir, config)
    assert report.data["certified_context"] == 16 and report.data["beyond_certified_context"] > 0
    assert report.data["longest_tokens"] > 16 and "longest context the certificate covers (16 tokens)" in caplog.text


def test_the_certificate_round_trips_through_json(runs: dict[str, Any]) -> None:
    from skipit.compressor.certificate import Certificate

    cert = runs["worst-domain"].certificate
    written = json.loads(json.dumps(cert.as_dict(), default=str))
    assert written["format"] == "skipit-certificate/1"
    back = Certificate.from_dict(written)
    assert back == cert and back.statement() == cert.statement() and back.kl_bound == cert.kl_bound
    manifest = json.loads((runs["worst-domain"].out_dir / "skipit_manifest.json").read_text())
    assert Certificate.from_dict(manifest["certificate"]).layers == cert.layers
