"""Every bad input gets one clear error, a non-zero exit, no traceback, and nothing written or changed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from skipit.cli import main
from skipit.atomic import OutputDir
from tiny_models import build_tokenizer  # tests/ is on sys.path (conftest)

LLAMA = "LlamaForCausalLM"


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["compress", *map(str, argv)])
    err = capsys.readouterr().err
    return code, " ".join(err.split())  # rich wraps long lines


@pytest.fixture()
def llama(tiny_model_dir, tmp_path: Path) -> Path:
    """A private copy of the tiny Llama that a test may damage."""
    return Path(shutil.copytree(tiny_model_dir(LLAMA), tmp_path / "llama"))


def _assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    leftovers = [p.name for p in out.parent.iterdir() if "skipit-tmp" in p.name]
    assert not leftovers, f"temporary dirs left behind: {leftovers}"


def _calib(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "data" / "calib.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = [json.dumps({"text": f"Sentence number {i} about the weather and the sea."}) for i in range(10)]


def test_missing_dir(capsys, tmp_path: Path) -> None:
    code, err = _run(capsys, tmp_path / "nope", tmp_path / "out")
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_not_a_model(capsys, tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    code, err = _run(capsys, tmp_path / "notes", tmp_path / "out")
    assert code == 2 and "not a model directory" in err and "config.json" in err
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_unknown_architecture_lists_supported(capsys, llama: Path, tmp_path: Path) -> None:
    cfg = json.loads((llama / "config.json").read_text())
    cfg["architectures"] = ["FooBarForCausalLM"]
    (llama / "config.json").write_text(json.dumps(cfg))
    code, err = _run(capsys, llama, tmp_path / "out")
    assert code == 2 and "FooBarForCausalLM" in err and "LlamaForCausalLM" in err and "Qwen2VLForConditionalGeneration" in err
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_unsupported_real_architecture_is_refused(capsys, tmp_path: Path) -> None:
    """GPT-2 exists in transformers but is not registered, and the probe cannot find its final norm."""
    cfg = transformers.GPT2Config(n_embd=32, n_layer=6, n_head=2, vocab_size=300, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    build_tokenizer().save_pretrained(tmp_path / "gpt2")  # a complete checkpoint: only the architecture is wrong
    code, err = _run(capsys, tmp_path / "gpt2", tmp_path / "out")
    assert code == 2 and "GPT2LMHeadModel" in err and "not supported" in err and "register" in err
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_truncated_safetensors(capsys, llama: Path, tmp_path: Path) -> None:
    weights = llama / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    before = _snapshot(llama)
    code, err = _run(capsys, llama, tmp_path / "out")
    assert code == 2 and "truncated" in err and "model.safetensors" in err
    assert _snapshot(llama) == before
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_corrupt_safetensors_header(capsys, llama: Path, tmp_path: Path) -> None:
    (llama / "model.safetensors").write_bytes(b"\xff" * 64)
    code, err = _run(capsys, llama, tmp_path / "out")
    assert code == 2 and "not a valid safetensors file" in err


def test_pickle_weights_refused(capsys, llama: Path, tmp_path: Path) -> None:
    (llama / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, llama / "pytorch_model.bin")
    code, err = _run(capsys, llama, tmp_path / "out")
    assert code == 2 and "--allow-pickle" in err
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_remote_code_refused(capsys, llama: Path, tmp_path: Path) -> None:
    cfg = json.loads((llama / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (llama / "config.json").write_text(json.dumps(cfg))
    code, err = _run(capsys, llama, tmp_path / "out")
    assert code == 2 and "--trust-remote-code" in err


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (GOOD[:3] + ["{not json"] + GOOD[3:], "calib.jsonl:4: not valid JSON"),
        (GOOD[:2] + [json.dumps({"txt": "wrong key"})] + GOOD[2:], 'calib.jsonl:3: each line must be an object with a non-empty "text"'),
        (GOOD + [json.dumps({"image": "missing.png", "text": "what is it?"})], "calib.jsonl:11: image"),
        (GOOD + [json.dumps({"image": "../../secret.png", "text": "what is it?"})], "escapes the data folder"),
    ],
    ids=["malformed-json", "missing-text", "missing-image", "escaping-image"],
)
def test_bad_calibration(capsys, tiny_model_dir, tmp_path: Path, lines: list[str], expected: str) -> None:
    calib = _calib(tmp_path, lines)
    code, err = _run(capsys, tiny_model_dir(LLAMA), tmp_path / "out", "--calib", calib, "--max-layers", "1")
    assert code == 2 and expected in err, err
    if "missing-image" in expected:
        assert "does not exist" in err
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_max_layers_too_large(capsys, tiny_model_dir, tmp_path: Path) -> None:
    code, err = _run(capsys, tiny_model_dir(LLAMA), tmp_path / "out", "--max-layers", "6")
    assert code == 2 and "--max-layers 6 must be smaller than the model's 6 decoder layers" in err
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_out_dir_exists(capsys, tiny_model_dir, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(capsys, tiny_model_dir(LLAMA), out, "--max-layers", "1")
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_out_dir_inside_input_refused(capsys, llama: Path) -> None:
    before = _snapshot(llama)
    code, err = _run(capsys, llama, llama / "out", "--max-layers", "1", "--overwrite")
    assert code == 2 and "overlaps the input" in err
    assert _snapshot(llama) == before


def test_nothing_removable_has_its_own_exit_code(capsys, tiny_model_dir, tmp_path: Path) -> None:
    """A random tiny model changes a lot when any layer goes: an impossible bound certifies nothing."""
    calib = _calib(tmp_path, GOOD)
    code, err = _run(capsys, tiny_model_dir(LLAMA), tmp_path / "out", "--calib", calib, "--max-kl", "1e-9")
    assert code == 3 and "no layer can be removed" in err and "Nothing was written" in err
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_interrupted_write_leaves_no_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), OutputDir(out) as output:
        (output.staging / "model").mkdir()
        (output.staging / "model" / "half.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt
    _assert_nothing_written(tmp_path, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no lock or staging file may stay behind"


def test_overwrite_replaces_only_when_complete(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "skipit_manifest.json").write_text("{}")
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), OutputDir(out, overwrite=True) as output:
        (output.staging / "new.txt").write_text("new")
        raise RuntimeError("crash mid-write")
    assert (out / "old.txt").read_text() == "old", "a failed run must leave the previous output intact"
    with OutputDir(out, overwrite=True) as output:
        (output.staging / "new.txt").write_text("new")
        output.commit()
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_console_script_exit_code_without_traceback(tmp_path: Path) -> None:
    """The installed entry point: one error line, exit 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "skipit.cli", "compress", str(tmp_path / "missing"), str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_sharded_checkpoint_loads_and_missing_shard_is_named(capsys, tiny_model_dir, tmp_path: Path) -> None:
    from skipit.compressor.arch import decoder_spec
    from skipit.compressor.loading import load_model

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir(LLAMA))
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    for f in tiny_model_dir(LLAMA).glob("tokenizer*"):
        shutil.copy(f, sharded / f.name)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").exists()
    loaded = load_model(sharded)
    assert decoder_spec(loaded.model).num_layers == 6
    with torch.no_grad():
        assert torch.equal(loaded.model.lm_head.weight, model.lm_head.weight)
    shards[-1].unlink()
    code, err = _run(capsys, sharded, tmp_path / "out")
    assert code == 2 and "missing weight shards" in err and shards[-1].name in err
    _assert_nothing_written(tmp_path, tmp_path / "out")
