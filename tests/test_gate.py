"""The CI gate: exit code 0 when the slim model is the original, 4 on a parity failure, 5 on a speed
failure, 6 on an ONNX mismatch; bound and data taken from the slim model's manifest; the CLI wrapper."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from skipit.compressor.arch import decoder_spec
from skipit.compressor.calibration import load_calibration
from skipit.compressor.loading import load_model
from skipit.compressor.certificate import Certificate
from skipit.compressor.manifest import Manifest, build_manifest, write_manifest
from skipit.compressor.rewrite import remove_layers_, save_checkpoint
from skipit.errors import InvalidOptionError
from skipit.validators.backend import BackendParityConfig
from skipit.cli.validate import add_validate_parser
from skipit.validators.gate import EXIT_EXPORT, EXIT_PARITY, EXIT_PASS, EXIT_SPEED, GateConfig, validate
from skipit.validators.parity import ParityConfig
from skipit.validators.speed import SpeedConfig

ARCH = "LlamaForCausalLM"
FAST = {"parity": ParityConfig(n_boot=200, new_tokens=4, batch_size=4, max_length=48),
        "backend": BackendParityConfig(samples=2, max_tokens=24, new_tokens=4),
        "speed": SpeedConfig(seq_lens=(8,), repeats=1, warmup=0, decode_tokens=2)}


def _manifest(removed: list[int], max_kl: float, described: dict) -> Manifest:
    """A manifest as skipit-compress writes it, for a slim model with ``removed`` taken out of 4 layers,
    certified under ``max_kl`` on the data ``described``."""
    cert = Certificate(layers=removed, order=removed, n_layers=4, policy={"max_kl": max_kl, "confidence": 0.95},
                       holdout={}, calibration={}, passes={})
    return build_manifest(source={"path": "original"}, architecture=ARCH, certificate=cert, config_diff={},
                          calibration=described, analyze_config={}, reload_check={})


def _test_split_size(data) -> int:
    from skipit.compressor.calibration import load_calibration

    return len(load_calibration(data).splits["test"])


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """(original dir, skipit-style out dir whose model/ lacks layer 2 and has a manifest, data file)."""
    root = tmp_path_factory.mktemp("gate")
    original = tiny_model_dir(ARCH)
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Note {i}: the cat sat on the mat and watched bird {i} fly."})
                              for i in range(20)))
    slim = load_model(original)
    remove_layers_(slim.model, decoder_spec(slim.model), [2])
    out = root / "out"
    save_checkpoint(slim.model, slim.processor, original, out / "model")
    described = load_calibration(data).describe()
    write_manifest(out, _manifest([2], 1e-9, described))
    return original, out, data


@pytest.fixture(scope="module")
def onnx_dirs(setup, tmp_path_factory):
    """ONNX exports of the original and of the slim model (legacy exporter: the fast one)."""
    from skipit.exporters.onnx import OnnxExportConfig, export_text_decoder

    original, out, _ = setup
    root = tmp_path_factory.mktemp("gate-onnx")
    cfg = OnnxExportConfig(exporter="legacy")
    return export_text_decoder(original, root / "original", cfg), export_text_decoder(out / "model", root / "slim", cfg)


def test_identical_models_pass(setup) -> None:
    original, _, data = setup
    report = validate(original, original, GateConfig(data=data, max_kl=1e-3, min_top1=0.99, **FAST))
    assert report.exit_code == EXIT_PASS and report.passed
    assert [c.name.split()[0] for c in report.checks] == ["kl", "top1"] and all(c.passed for c in report.checks)
    assert report.parity.generation.sequence_match.mean == 1.0
    assert report.data["split"] == "test" and report.data["samples"] == _test_split_size(data)
    assert report.summary().startswith("skipit validate: PASS (exit code 0)")
    assert json.loads(json.dumps(report.as_dict()))["exit_code"] == 0


def test_removed_layer_fails_an_impossible_kl_bound_with_exit_4(setup) -> None:
    original, out, data = setup
    report = validate(original, out / "model", GateConfig(data=data, max_kl=1e-9, **FAST))
    assert report.parity.logits.kl.mean > 1e-4
    assert report.exit_code == EXIT_PARITY and report.failed_kinds == ["parity"]
    assert "FAIL: parity" in report.summary()
    assert report.removed == [2]  # read from the manifest beside model/


def test_manifest_gives_data_and_certified_bound(setup) -> None:
    original, out, data = setup
    report = validate(original, out, GateConfig(**FAST))  # skipit's OUT_DIR; no --data, no --max-kl
    assert report.data["matches_manifest"] is True and report.data["samples"] == _test_split_size(data)
    (kl,) = report.checks
    assert kl.bound == 1e-9 and "certificate" in kl.note
    assert report.exit_code == EXIT_PARITY


def test_speed_failure_is_exit_5(setup) -> None:
    original, _, data = setup
    report = validate(original, original, GateConfig(data=data, max_kl=1e-3, min_speedup=1e6, **FAST))
    assert report.exit_code == EXIT_SPEED
    assert {c.kind for c in report.checks if not c.passed} == {"speed"}
    assert set(report.speed.runners) == {"original", "slim"}


def test_onnx_parity_and_mismatch_is_exit_6(setup, onnx_dirs) -> None:
    original, out, data = setup
    original_onnx, slim_onnx = onnx_dirs
    good = validate(original, out, GateConfig(data=data, max_kl=10.0, onnx=slim_onnx, **FAST))
    assert good.exit_code == EXIT_PASS and good.onnx.logits.max_abs < 1e-3
    assert good.onnx.generation.sequence_match == 1.0
    # the original's graph is not the slim model: export mismatch
    bad = validate(original, out, GateConfig(data=data, max_kl=10.0, onnx=original_onnx.parent.parent, **FAST))
    assert bad.exit_code == EXIT_EXPORT and not bad.onnx.logits
    assert bad.onnx.logits.required_atol > 1e-3


def test_cli_writes_json_and_returns_the_exit_code(setup, tmp_path: Path) -> None:
    original, out, data = setup
    parser = argparse.ArgumentParser(prog="skipit")
    add_validate_parser(parser.add_subparsers(dest="command", required=True))
    report = tmp_path / "report.json"
    args = parser.parse_args(["validate", str(original), str(out), "--data", str(data), "--max-kl", "1e-9",
                              "--new-tokens", "2", "--json", str(report)])
    assert args.func(args) == EXIT_PARITY
    saved = json.loads(report.read_text())
    assert saved["exit_code"] == EXIT_PARITY and saved["checks"][0]["passed"] is False
    bad = parser.parse_args(["validate", str(original), str(out), "--data", str(data), "--max-kl", "-1"])
    assert bad.func(bad) == 2  # InvalidOptionError → the CLI's error exit code
    no_answers = parser.parse_args(["validate", str(original), str(out), "--data", str(data), "--accuracy"])
    assert no_answers.func(no_answers) == 2  # MissingAnswersError


def test_config_validates_itself() -> None:
    with pytest.raises(InvalidOptionError, match="split"):
        GateConfig(split="train")
    with pytest.raises(InvalidOptionError, match="min-speedup"):
        GateConfig(min_speedup=0)


def test_report_paths_name_the_final_output_not_the_staging_folder(tmp_path: Path) -> None:
    """skipit-compress --validate validates OUT while it is staged in .OUT.skipit-tmp-*: the report names OUT."""
    from skipit.validators.gate import final_path

    assert final_path(tmp_path / ".out.skipit-tmp-k2j4x" / "model") == str(tmp_path / "out" / "model")
    assert final_path(tmp_path / ".out.skipit-tmp-k2j4x" / "onnx" / "onnx") == str(tmp_path / "out" / "onnx" / "onnx")
    assert final_path(tmp_path / "out" / "model") == str(tmp_path / "out" / "model")


def test_certified_in_memory_is_what_the_gate_uses(setup):
    """skipit-compress --validate hands over its manifest and calibration set (``Certified``): the gate checks
    the bound and the test split given in memory, not the manifest beside the model nor a reload of the data."""
    from skipit.validators.gate import Certified

    original, out, data = setup
    calib = load_calibration(data, seed=3)  # a split the gate would not draw from the file by itself
    manifest = _manifest([2], 10.0, calib.describe())
    report = validate(original, out, GateConfig(**FAST), certified=Certified(manifest, calib))
    assert report.data["samples"] == len(calib.split("test")) and report.data["matches_manifest"] is True
    kl = next(c for c in report.checks if c.name.startswith("kl"))
    assert kl.bound == 10.0 and report.passed  # the file's manifest says 1e-9, which would fail
    assert report.removed == [2]


def test_data_record_round_trip(setup, tmp_path):
    """The manifest's data record gives back the very splits certification drew (another seed draws others);
    other texts do not match it; a record of an unknown format is refused."""
    _, _, data = setup
    drawn = load_calibration(data, seed=3)
    record = json.loads(json.dumps(drawn.describe()))
    again = load_calibration(data)
    assert again.splits != drawn.splits and again.restore_splits(record) and again.splits == drawn.splits
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"text": f"Another note {i}."}) for i in range(20)))
    assert not load_calibration(other).restore_splits(record)
    with pytest.raises(InvalidOptionError, match="data record format"):
        again.restore_splits({**record, "format": "skipit-data/9"})
