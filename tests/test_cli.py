"""The CLI's habits (issue 12): --version, one dtype spelling everywhere, JSON errors, quiet and plain
(non-terminal) output with a line per step and no library noise, help with examples and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from skipit.cli import build_parser, main

CLI = [sys.executable, "-m", "skipit.cli"]


def _cli(*argv: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, argv)], capture_output=True, text=True)


def test_version() -> None:
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("skipit 0.") and "transformers" in proc.stdout
    proc = subprocess.run([sys.executable, "-c", "import sys; from skipit.cli import compress_main; "
                           "sys.exit(compress_main(['--version']))"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("skipit ")


def test_help_shows_examples_and_exit_codes() -> None:
    for command in ("compress", "analyze", "export", "validate"):
        proc = _cli(command, "--help")
        assert proc.returncode == 0 and "exit codes:" in proc.stdout, command
        assert "3  no layer can be removed" in proc.stdout and "6  exported graph" in proc.stdout


@pytest.mark.parametrize(("spelling", "canonical"), [("fp16", "float16"), ("float16", "float16"), ("bf16", "bfloat16"),
                                                     ("FP32", "float32"), ("auto", "auto")])
def test_one_dtype_spelling_across_commands(spelling: str, canonical: str) -> None:
    parser = build_parser()
    assert parser.parse_args(["compress", "m", "o", "--dtype", spelling]).dtype == canonical
    assert parser.parse_args(["export", "m", "o", "--dtype", spelling]).dtype == canonical
    assert parser.parse_args(["validate", "a", "b", "--dtype", spelling]).dtype == canonical
    with pytest.raises(SystemExit):
        parser.parse_args(["compress", "m", "o", "--dtype", "int3"])


def test_json_error_object_on_every_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["compress", str(tmp_path / "missing"), str(tmp_path / "out"), "--json"])
    error = json.loads(capsys.readouterr().out)["error"]
    assert code == 2 and error["exit_code"] == 2 and "does not exist" in error["message"]
    report = tmp_path / "gate.json"
    code = main(["validate", str(tmp_path / "missing"), str(tmp_path / "slim"), "--json", str(report)])
    assert code == 2 and json.loads(report.read_text())["error"]["exit_code"] == 2


def test_plain_output_has_a_line_per_step_and_no_library_noise(tiny_model_dir, tmp_path: Path) -> None:
    """stderr is a pipe here (not a terminal): no bars, one line per verified step with its figures."""
    out = tmp_path / "out"
    proc = _cli("compress", tiny_model_dir("LlamaForCausalLM"), out, "--max-layers", "1", "--calib-limit", "12",
                "--max-length", "24", "--batch-size", "4", "--probe-width", "1")
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "Loading weights" not in err and "Writing model shards" not in err and "it/s]" not in err, err
    steps = [line for line in err.splitlines() if line.startswith("layer ") and "KL" in line and "top-1" in line]
    assert steps and "held-out check of" in err and "reloading the checkpoint" in err
    assert "removed layers" in err  # the summary table


def test_quiet_prints_only_errors(tiny_model_dir, tmp_path: Path) -> None:
    proc = _cli("compress", tiny_model_dir("LlamaForCausalLM"), tmp_path / "out", "-q", "--max-layers", "1",
                "--calib-limit", "12", "--max-length", "24", "--batch-size", "4", "--probe-width", "1")
    assert proc.returncode == 0 and proc.stderr.strip() == "" and proc.stdout.strip() == ""
    proc = _cli("compress", tmp_path / "missing", tmp_path / "out2", "-q")
    assert proc.returncode == 2 and "does not exist" in proc.stderr


@pytest.mark.parametrize(("argv", "blocked", "pip"), [
    (["--export", "onnx"], "onnxscript", "skipit[onnx]"),
    (["--export", "onnx", "--exporter", "legacy"], "onnxruntime", "skipit[onnx]"),
    ([], "gguf", "skipit[gguf]"),
])
def test_a_missing_extra_stops_before_any_work(tiny_model_dir, smollm2_gguf: Path, tmp_path: Path, argv: list[str],
                                               blocked: str, pip: str) -> None:
    """As in an environment without that package (``sys.modules[name] = None`` makes it unimportable)."""
    import time

    model = smollm2_gguf if blocked == "gguf" else tiny_model_dir("LlamaForCausalLM")
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            "from skipit.cli import compress_main; sys.exit(compress_main(sys.argv[1:]))")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(model), str(tmp_path / "out"), "--max-layers", "1", *argv],
                          capture_output=True, text=True)
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and f"pip install '{pip}'" in err and blocked in err, err
    assert time.perf_counter() - started < 60 and "certifying" not in err
    assert list(tmp_path.iterdir()) == []
