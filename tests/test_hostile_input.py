"""Hostile input (issue 9, input half): a model that was not loaded whole is never certified, every bad
input is one clear line with exit 2 (6 for a tokenizer or graph that does not match), hostile calibration
data stays within bounded memory, and nothing is written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from skipit.cli import main
from skipit.compressor.calibration import MAX_IMAGE_PIXELS, load_calibration
from skipit.compressor.loading import load_model
from test_bad_input import GOOD, _assert_nothing_written, _calib, _run, llama  # noqa: F401 - llama is a fixture
from tiny_models import ARCHITECTURES  # tests/ is on sys.path (conftest)

LLAMA, LLAVA = "LlamaForCausalLM", "LlavaForConditionalGeneration"


def _edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


def _edit_weights(model_dir: Path, edit) -> None:
    weights = load_file(model_dir / "model.safetensors")
    edit(weights)
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})


# --------------------------------------------------------------------------- config / weights mismatch

def _more_layers(d: Path) -> None:
    _edit_config(d, num_hidden_layers=8)


def _fewer_layers(d: Path) -> None:
    _edit_config(d, num_hidden_layers=4)


def _wrong_shape(d: Path) -> None:
    _edit_weights(d, lambda w: w.__setitem__("model.layers.1.mlp.up_proj.weight", torch.zeros(100, 64)))


@pytest.mark.parametrize(("damage", "expected"), [
    (_more_layers, ["missing from the weights, so random: 18 tensors", "model.layers.6.", "Layers involved: 6–7"]),
    (_fewer_layers, ["in the weights but not in the model, so dropped: 18 tensors", "model.layers.4.", "Layers involved: 4–5"]),
    (_wrong_shape, ["of the wrong shape: 1 tensor (model.layers.1.mlp.up_proj.weight"]),  # 5.x adds the shapes
], ids=["config-8-weights-6", "config-4-weights-6", "wrong-shape"])
def test_config_weights_mismatch_is_refused(capsys, llama: Path, tmp_path: Path, damage, expected: list[str]) -> None:
    damage(llama)
    code, err = _run(capsys, llama, tmp_path / "out", "--max-layers", "1")
    assert code == 2 and "do not match config.json" in err and "Traceback" not in err, err
    assert all(e in err for e in expected), err
    _assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_healthy_checkpoints_load_without_complaint(tiny_model_dir, arch: str) -> None:
    """Tied lm_heads, rotary buffers and VLM towers are not mistaken for missing or unexpected weights."""
    loaded = load_model(tiny_model_dir(arch))
    assert loaded.model.config.get_text_config().num_hidden_layers == 6


# --------------------------------------------------------------------------- GGUF

_GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_TOP:
        return _GGUF_TOP[hf_name]
    _, _, layer, *module, _ = hf_name.split(".")
    return f"blk.{layer}.{_GGUF_NAMES['.'.join(module)]}.weight"


def _write_gguf(src: Path, dst: Path, block_count: int | None = None, drop: tuple[str, ...] = (),
                merges: tuple[str, ...] = ("Ġ t", "Ġ a")) -> Path:
    """The tiny Llama as an F32 GGUF, less the tensors whose names start with one of ``drop``, with a byte-level
    gpt2 tokenizer plus the tokens ``Ġt``, ``Ġa`` and their merges (two: transformers 4.57 reads a one-element
    GGUF array as a scalar)."""
    import gguf

    config = json.loads((src / "config.json").read_text())
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])] + ["Ġt", "Ġa"]
    writer = gguf.GGUFWriter(str(dst), "llama")
    writer.add_block_count(config["num_hidden_layers"] if block_count is None else block_count)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i < 3 else 1 for i in range(len(tokens))])
    writer.add_token_merges(list(merges))
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["</s>"])
    writer.add_pad_token_id(vocab["<pad>"])
    for hf_name, tensor in load_file(src / "model.safetensors").items():
        name = _gguf_name(hf_name)
        if not any(name.startswith(prefix) for prefix in drop):
            writer.add_tensor(name, tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture()
def gguf_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "gguf"
    folder.mkdir()
    return folder


def test_healthy_tiny_gguf_loads(tiny_model_dir, gguf_dir: Path) -> None:
    """The GGUF the tests below damage is itself sound: the block check does not fire on it."""
    loaded = load_model(_write_gguf(tiny_model_dir(LLAMA), gguf_dir / "ok.gguf"))
    assert loaded.model.config.num_hidden_layers == 6 and loaded.gguf_file == "ok.gguf"


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"block_count": 8}, "says 8 blocks (llama.block_count) but its tensors are for blocks 0–5 (block(s) 6–7 would be random)"),
    ({"block_count": 4}, "says 4 blocks (llama.block_count) but its tensors are for blocks 0–5 (the tensors of block(s) 4–5 would be dropped)"),
    ({"drop": ("blk.3.",)}, "says 6 blocks (llama.block_count) but its tensors are for blocks 0–2, 4–5 (block(s) 3 would be random)"),
    ({"drop": ("blk.2.attn_q.",)}, "do not match its GGUF metadata: missing from the weights, so random: 1 tensor "
                                   "(model.layers.2.self_attn.q_proj.weight)"),
], ids=["block-count-8-tensors-6", "block-count-4-tensors-6", "block-3-cut-out", "one-tensor-cut-out"])
def test_gguf_metadata_weights_mismatch_is_refused(capsys, tiny_model_dir, gguf_dir: Path, tmp_path: Path,
                                              kwargs: dict, expected: str) -> None:
    path = _write_gguf(tiny_model_dir(LLAMA), gguf_dir / "m.gguf", **kwargs)
    code, err = _run(capsys, path, tmp_path / "out", "--max-layers", "1")
    assert code == 2 and expected in err and "Traceback" not in err, err
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_gguf_cut_inside_its_header(capsys, tiny_model_dir, gguf_dir: Path, tmp_path: Path) -> None:
    path = _write_gguf(tiny_model_dir(LLAMA), gguf_dir / "m.gguf")
    path.write_bytes(path.read_bytes()[:200])  # inside the metadata (the token list)
    code, err = _run(capsys, path, tmp_path / "out")
    assert code == 2 and "is not a readable GGUF file" in err and "download it again" in err, err
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_gguf_whose_tokenizer_cannot_be_built(capsys, tiny_model_dir, gguf_dir: Path, tmp_path: Path) -> None:
    """A merge naming a token the vocabulary lacks: the tokenizers library raises a bare Exception."""
    path = _write_gguf(tiny_model_dir(LLAMA), gguf_dir / "m.gguf", merges=("Ġ t", "Ġ z"))
    code, err = _run(capsys, path, tmp_path / "out")
    assert code == 2 and "the tokenizer of" in err and "cannot be built" in err and "out of vocabulary" in err, err
    _assert_nothing_written(tmp_path, tmp_path / "out")


# --------------------------------------------------------------------------- one line, exit 2

def test_calibration_not_utf8(capsys, tiny_model_dir, tmp_path: Path) -> None:
    calib = _calib(tmp_path, GOOD)
    calib.write_bytes(calib.read_bytes().replace(b"weather", b"w\xe9ather", 3))  # Latin-1, not UTF-8
    code, err = _run(capsys, tiny_model_dir(LLAMA), tmp_path / "out", "--calib", calib)
    assert code == 2 and "calib.jsonl:1: not UTF-8 text" in err and "save the file as UTF-8" in err, err
    _assert_nothing_written(tmp_path, tmp_path / "out")


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A valid 1×1 PNG whose header is rewritten to declare ``width`` × ``height`` (a decompression bomb's header)."""
    from PIL import Image

    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts after the signature (8) and length+type (8)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("side", [20000, 9000], ids=["pil-bomb-20000", "over-skipit-limit-9000"])
def test_decompression_bomb_png(capsys, tiny_model_dir, tmp_path: Path, side: int) -> None:
    assert side * side > MAX_IMAGE_PIXELS
    calib = _calib(tmp_path, GOOD + [json.dumps({"image": "bomb.png", "text": "what is it?"})])
    _png_declaring(calib.parent / "bomb.png", side, side)
    code, err = _run(capsys, tiny_model_dir(LLAVA), tmp_path / "out", "--calib", calib)
    assert code == 2 and "calib.jsonl:11: image" in err and "declares more than 67,108,864 pixels" in err, err
    _assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.fixture()
def no_hang():
    """Fail, rather than hang forever, a test that blocks (opening a FIFO with no writer blocks)."""
    def timeout(*_):
        raise TimeoutError("blocked for 60 s")
    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_image_that_is_a_fifo_or_directory(capsys, tiny_model_dir, tmp_path: Path, no_hang, kind: str) -> None:
    calib = _calib(tmp_path, GOOD + [json.dumps({"image": "pic.png", "text": "what is it?"})])
    os.mkfifo(calib.parent / "pic.png") if kind == "fifo" else (calib.parent / "pic.png").mkdir()
    code, err = _run(capsys, tiny_model_dir(LLAVA), tmp_path / "out", "--calib", calib)
    assert code == 2 and "calib.jsonl:11: image" in err and "is not a regular file" in err, err
    _assert_nothing_written(tmp_path, tmp_path / "out")


def _safetensors_with_header(path: Path, header) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)


@pytest.mark.parametrize(("header", "expected"), [
    ([1, 2, 3], "its header is a JSON list, not an object"),
    ({"w": {"dtype": "F32", "shape": [4]}}, "tensor 'w' has no valid data_offsets"),
], ids=["json-list", "no-data-offsets"])
def test_safetensors_header_malformed(capsys, llama: Path, tmp_path: Path, header, expected: str) -> None:
    _safetensors_with_header(llama / "model.safetensors", header)
    code, err = _run(capsys, llama, tmp_path / "out")
    assert code == 2 and "is not a valid safetensors file" in err and expected in err, err
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_config_json_is_a_list(capsys, llama: Path, tmp_path: Path) -> None:
    (llama / "config.json").write_text(json.dumps([{"architectures": ["LlamaForCausalLM"]}]))
    code, err = _run(capsys, llama, tmp_path / "out")
    assert code == 2 and "config.json holds a JSON list, not the JSON object a model config is" in err, err
    _assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(("device", "expected"), [
    ("bogus", "--device 'bogus' is not a torch device"),
    pytest.param("cuda", "--device cuda: this torch", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this torch has CUDA: the CPU-only refusal cannot be seen here")),
])
def test_bad_device(capsys, tiny_model_dir, tmp_path: Path, device: str, expected: str) -> None:
    code, err = _run(capsys, tiny_model_dir(LLAMA), tmp_path / "out", "--device", device)
    assert code == 2 and expected in err and "internal error" not in err, err
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_image_lines_for_a_text_only_model_warn(caplog, tmp_path: Path) -> None:
    from PIL import Image

    lines = GOOD[:4] + [json.dumps({"image": "pic.png", "text": f"what is {i}?"}) for i in range(3)] + GOOD[4:]
    calib = _calib(tmp_path, lines)
    Image.new("RGB", (8, 8)).save(calib.parent / "pic.png")
    with caplog.at_level("WARNING", logger="skipit.compressor.calibration"):
        data = load_calibration(calib, with_images=False)
    assert "3 of 13 lines name an image (first on line 5), but the model is text-only" in caplog.text
    assert "images are ignored" in caplog.text
    assert all(s.image is None for s in data.samples) and data.samples[4].text == "what is 0?"
    caplog.clear()
    assert sum(s.image is not None for s in load_calibration(calib, with_images=True).samples) == 3
    assert "text-only" not in caplog.text


# --------------------------------------------------------------------------- skipit validate

VALIDATE_DATA = [json.dumps({"text": f"Note {i}: the cat sat on the mat and watched bird {i} fly."}) for i in range(20)]


@pytest.fixture(scope="module")
def slim_out(tiny_model_dir, tmp_path_factory) -> Path:
    """A skipit-style output folder whose ``model/`` is the tiny Llama without layer 2."""
    from skipit.compressor.arch import decoder_spec
    from skipit.compressor.rewrite import remove_layers_, save_checkpoint

    slim = load_model(tiny_model_dir(LLAMA))
    remove_layers_(slim.model, decoder_spec(slim.model), [2])
    out = tmp_path_factory.mktemp("hostile-validate") / "out"
    save_checkpoint(slim.model, slim.processor, tiny_model_dir(LLAMA), out / "model")
    return out


def _validate(capsys, tiny_model_dir, slim: Path, tmp_path: Path, *extra: str) -> tuple[int, str]:
    data = _calib(tmp_path, VALIDATE_DATA)
    code = main(["validate", str(tiny_model_dir(LLAMA)), str(slim), "--data", str(data), "--max-kl", "10",
                 "--new-tokens", "0", "--json", str(tmp_path / "report.json"), *extra])
    err = " ".join(capsys.readouterr().err.split())
    return code, err


def _assert_error_report(path: Path, code: int) -> None:
    """A refused gate leaves no report that could pass for a result: only the JSON error object."""
    written = json.loads(path.read_text())
    assert set(written) == {"error"} and written["error"]["exit_code"] == code, written


def _edit_tokenizer(model_dir: Path, edit) -> None:
    path = model_dir / "tokenizer.json"
    tok = json.loads(path.read_text())
    edit(tok)
    path.write_text(json.dumps(tok))


def _swap_ids(tok: dict) -> None:
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["e"] = vocab["e"], vocab["a"]


def _lowercase(tok: dict) -> None:
    tok["normalizer"] = {"type": "Lowercase"}


@pytest.mark.parametrize(("edit", "code", "expected"), [
    (None, 0, None),
    (_swap_ids, 6, "maps 2 tokens to other ids than the original's (token: original vs slim — 'a': "),
    (_lowercase, 6, "encodes the evaluation data differently from the original's (input_ids of the batch"),
], ids=["untouched-passes", "ids-shuffled", "same-vocabulary-other-encoding"])
def test_validate_checks_the_slim_models_own_tokenizer(capsys, tiny_model_dir, slim_out: Path, tmp_path: Path,
                                                       edit, code: int, expected: str | None) -> None:
    slim = Path(shutil.copytree(slim_out, tmp_path / "slim"))
    if edit is not None:
        _edit_tokenizer(slim / "model", edit)
    got, err = _validate(capsys, tiny_model_dir, slim, tmp_path)
    assert got == code, err
    if expected is not None:
        assert expected in err and "copy the original's tokenizer" in err and "Traceback" not in err, err
        _assert_error_report(tmp_path / "report.json", code)


def test_validate_slim_with_another_vocabulary(capsys, tiny_model_dir, slim_out: Path, tmp_path: Path) -> None:
    slim = load_model(slim_out / "model")
    slim.model.resize_token_embeddings(330)
    other = tmp_path / "other"
    slim.model.save_pretrained(other / "model")
    for f in (slim_out / "model").glob("tokenizer*"):
        shutil.copy(f, other / "model" / f.name)
    code, err = _validate(capsys, tiny_model_dir, other, tmp_path)
    assert code == 2 and "predicts over 330 tokens but the original" in err and "over 320" in err, err
    _assert_error_report(tmp_path / "report.json", 2)


def _onnx_declaring_vocab(folder: Path, vocab: int | None) -> Path:
    """A stand-in export: a graph whose ``logits`` output declares ``vocab`` (None: dynamic), and a config.json."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab or "vocab"])
    graph = helper.make_graph([helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)], "g", [ids], [logits])
    onnx.save(helper.make_model(graph), folder / "model.onnx")
    (folder / "config.json").write_text(json.dumps({"vocab_size": 999}))
    return folder


@pytest.mark.parametrize(("vocab", "source"), [(777, "model.onnx"), (None, "config.json")],
                         ids=["graph-logits", "folder-config"])
def test_validate_onnx_with_another_vocabulary(capsys, tiny_model_dir, slim_out: Path, tmp_path: Path,
                                               vocab: int | None, source: str) -> None:
    onnx_dir = _onnx_declaring_vocab(tmp_path / "export", vocab)
    code, err = _validate(capsys, tiny_model_dir, slim_out, tmp_path, "--onnx", str(onnx_dir))
    assert code == 6 and f"{source} predicts over {vocab or 999} tokens but the slim model" in err, err
    assert "export the slim model again" in err
    _assert_error_report(tmp_path / "report.json", 6)


# --------------------------------------------------------------------------- bounded memory

_MEMORY_PROBE = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))
from skipit.cli import main
from skipit.compressor.arch import decoder_spec
from skipit.compressor.calibration import load_calibration
from skipit.compressor.batches import encode
from skipit.compressor.loading import load_model

model_dir, normal, long, huge, out = sys.argv[1:]
loaded = load_model(model_dir)
spec = decoder_spec(loaded.model)
for name, path in (("normal", normal), ("long", long)):
    data = load_calibration(path)
    for split in ("calibration", "holdout", "test"):
        encode(data.split(split), loaded.processor, spec, batch_size=8, max_length=128)
    print(json.dumps({name: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), flush=True)
print(json.dumps({"huge_exit": main(["compress", model_dir, out, "--calib", huge])}), flush=True)
"""


@pytest.fixture(scope="module")
def memory_probe(tiny_model_dir, tmp_path_factory) -> dict:
    """One subprocess under a 6 GiB address-space limit: peak RSS after encoding a normal file, then after a
    file with 3.5 MB lines (legal: under the 4 MiB limit), then the CLI on a file with a 50 MB line."""
    root = tmp_path_factory.mktemp("memory")
    normal, long, huge = root / "normal.jsonl", root / "long.jsonl", root / "calib.jsonl"
    normal.write_text("\n".join(GOOD) + "\n")
    big_line = json.dumps({"text": ("the sea and the weather " * 150_000)[:3_500_000]})
    long.write_text("\n".join([big_line] * 4 + GOOD[:6]) + "\n")
    with huge.open("w") as fh:
        fh.write("\n".join(GOOD[:2]) + "\n" + json.dumps({"text": "x" * 50_000_000}) + "\n" + "\n".join(GOOD[2:]) + "\n")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(tiny_model_dir(LLAMA)), str(normal), str(long),
                           str(huge), str(root / "out")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"})
    found = {k: v for line in proc.stdout.splitlines() if line.startswith("{") for k, v in json.loads(line).items()}
    return {**found, "exit": proc.returncode, "stderr": " ".join(proc.stderr.split()), "root": root}


def test_a_50mb_calibration_line_is_refused_under_a_memory_limit(memory_probe: dict) -> None:
    err = memory_probe["stderr"]
    assert memory_probe.get("huge_exit") == 2, f"exit {memory_probe['exit']}: {err[-2000:]}"
    assert "calib.jsonl:3: line is longer than 4 MiB (the limit per line)" in err and "Traceback" not in err, err
    assert not (memory_probe["root"] / "out").exists()


def test_long_legal_lines_keep_peak_memory_bounded(memory_probe: dict) -> None:
    """Each 3.5 MB text is cut to what --max-length can use before tokenizing (uncut: ~1 GB each)."""
    assert "long" in memory_probe, f"the probe died (exit {memory_probe['exit']}): {memory_probe['stderr'][-2000:]}"
    assert memory_probe["long"] <= 1.2 * memory_probe["normal"], memory_probe
