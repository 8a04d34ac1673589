"""GGUF in → GGUF out: block drop on small GGUFs built here (renumbering, per-layer metadata, bytes kept,
every refusal), then the real SmolLM2 Q4_1 GGUF with blocks 16 and 17 removed, run in llama.cpp itself
(node-llama-cpp's prebuilt CPU binary) next to the torch model with the same layers removed.

llama.cpp runs Q4_1 weights; torch runs their dequantized fp32 values, so the two never agree exactly.
The check is relative: the slim GGUF in llama.cpp must agree with the slim torch model about as well as
the original GGUF in llama.cpp agrees with the original torch model (greedy tokens, 8 prompts × 12).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from skipit.errors import BackendUnavailableError, ExportError
from skipit.exporters.gguf import export_gguf, gguf_block_count

gguf = pytest.importorskip("gguf")

REPO = Path(__file__).resolve().parents[1]
NODE_DIR = Path(os.environ.get("SKIPIT_NODE_DIR") or REPO / ".node")
REMOVED = [16, 17]
# Greedy agreement with torch may drop by at most this much (token-level match rate) when the two
# blocks go: Q4_1 rounding and fp32 drift apart differently once the layer stack changes, but a wrong
# block order, a stale block_count or a mangled tensor makes the slim GGUF produce unrelated text
# (agreement near 0, measured by removing other layers on the torch side: see test below).
MARGIN = 0.15
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "def fibonacci(n):",
    "The best way to learn a new language is",
    "In 1969, the first humans",
    "Photosynthesis is the process by which",
]
NEW_TOKENS = 12


# --------------------------------------------------------------------------------------------------
# Small GGUFs written here
# --------------------------------------------------------------------------------------------------
def _block_tensors(i: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        f"blk.{i}.attn_norm.weight": np.full(32, i + 1, dtype=np.float32),
        f"blk.{i}.attn_q.weight": rng.standard_normal((32, 32)).astype(np.float32),
    }


def write_gguf(path: Path, arch: str = "llama", n_blocks: int = 6, blocks: list[int] | None = None,
               extra: dict | None = None, endianess: "gguf.GGUFEndian | None" = None) -> Path:
    """A GGUF with Q4_1 attention weights, F32 norms, per-layer and non-per-layer arrays, odd tokens."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, arch, endianess=endianess or gguf.GGUFEndian.LITTLE)
    w.add_uint32(f"{arch}.block_count", n_blocks)
    w.add_uint32(f"{arch}.context_length", 128)
    w.add_array(f"{arch}.attention.head_count", [10 + i for i in range(n_blocks)])  # per layer
    w.add_array(f"{arch}.rope.dimension_sections", [1, 2, 3, 4])  # not per layer, even with 4 blocks
    w.add_float32(f"{arch}.rope.freq_base", 12345.0)
    w.add_string("tokenizer.chat_template", "{{ messages }}")
    # token strings stored as bytes: one is not valid UTF-8 and must survive byte for byte
    w.add_key_value("tokenizer.ggml.tokens", [b"<s>", b"hello", b"\xff\xfe"], gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.STRING)
    for key, (value, vtype) in (extra or {}).items():
        w.add_key_value(key, value, vtype)
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 32)).astype(np.float32))
    for i in blocks if blocks is not None else range(n_blocks):
        for name, arr in _block_tensors(i, rng).items():
            if name.endswith("attn_q.weight"):
                q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q4_1)
                w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
            else:
                w.add_tensor(name, arr)
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tensors(path: Path) -> dict[str, object]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_block_drop_renumbers_slices_and_keeps_bytes(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "src.gguf")
    result = export_gguf(src, [np.int64(4), 1, 2, 2], tmp_path / "out.gguf")  # certificate order, numpy ints
    assert result.removed == (1, 2, 4)
    assert result.as_dict()["file"] == "out.gguf" and "path" not in result.as_dict()
    assert result.path == tmp_path / "out.gguf" and result.block_count_after == 3
    assert result.sliced_keys == ("llama.attention.head_count",)
    reader = gguf.GGUFReader(result.path)
    assert reader.fields["llama.block_count"].contents() == 3
    assert reader.fields["llama.attention.head_count"].contents() == [10, 13, 15]  # blocks 0, 3, 5
    assert reader.fields["llama.rope.dimension_sections"].contents() == [1, 2, 3, 4]
    assert reader.fields["llama.rope.freq_base"].contents() == 12345.0
    assert reader.fields["tokenizer.chat_template"].contents() == "{{ messages }}"
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert [bytes(tokens.parts[i]) for i in tokens.data] == [b"<s>", b"hello", b"\xff\xfe"]
    before, after = _tensors(src), _tensors(result.path)
    assert sorted(after) == sorted(["token_embd.weight", "output_norm.weight",
                                    *[f"blk.{i}.{n}" for i in range(3) for n in ("attn_norm.weight", "attn_q.weight")]])
    for new, old in enumerate([0, 3, 5]):
        for part in ("attn_norm.weight", "attn_q.weight"):
            a, b = after[f"blk.{new}.{part}"], before[f"blk.{old}.{part}"]
            assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape)
            assert bytes(np.asarray(a.data).view(np.uint8)) == bytes(np.asarray(b.data).view(np.uint8))
    assert after["blk.1.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_1
    assert float(np.asarray(after["blk.1.attn_norm.weight"].data)[0]) == 4.0  # original block 3
    assert gguf_block_count(result.path) == 3
    umask = os.umask(0)
    os.umask(umask)
    assert result.path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_arrays_that_are_not_per_layer_are_copied_even_at_that_length(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "src.gguf", n_blocks=4)
    out = gguf.GGUFReader(export_gguf(src, [0], tmp_path / "out.gguf").path)
    assert out.fields["llama.attention.head_count"].contents() == [11, 12, 13]
    assert out.fields["llama.rope.dimension_sections"].contents() == [1, 2, 3, 4]


def test_leading_dense_blocks_are_recounted(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "src.gguf", arch="deepseek2",
                     extra={"deepseek2.leading_dense_block_count": (3, gguf.GGUFValueType.UINT32)})
    out = export_gguf(src, [0, 4], tmp_path / "out.gguf").path
    assert gguf.GGUFReader(out).fields["deepseek2.leading_dense_block_count"].contents() == 2


@pytest.mark.parametrize("blocks, message", [
    ([0, 1, 2, 3, 4], "missing: 5"),  # block_count 6, one block short: truncated or inconsistent
    ([0, 1, 2, 3, 4, 5, 6], "beyond block_count: 6"),
    ([0, 1, 3, 4, 5, 6], "missing: 2"),
])
def test_blocks_that_do_not_match_block_count_are_refused(tmp_path: Path, blocks, message) -> None:
    src = write_gguf(tmp_path / "src.gguf", blocks=blocks)
    with pytest.raises(ExportError, match=message) as err:
        export_gguf(src, [1], tmp_path / "out.gguf")
    assert "block_count is 6" in str(err.value)
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("removed, message", [
    ([6], r"blocks \[6\] are not in"),
    ([-1], r"blocks \[-1\] are not in"),
    (list(range(6)), "leaves no decoder block"),
    ([1.0], r"blocks \[1.0\] are not in"),
])
def test_bad_block_indices_are_refused(tmp_path: Path, removed, message) -> None:
    src = write_gguf(tmp_path / "src.gguf")
    with pytest.raises(ExportError, match=message):
        export_gguf(src, removed, tmp_path / "out.gguf")


def test_failed_export_leaves_the_old_output_and_no_temp_file(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "src.gguf", blocks=[0, 1, 2])
    out = tmp_path / "out.gguf"
    out.write_bytes(b"previous export")
    with pytest.raises(ExportError):
        export_gguf(src, [1], out)
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf", "src.gguf"]
    good = write_gguf(tmp_path / "good.gguf")
    export_gguf(good, [1], out)  # a successful export replaces it
    assert gguf_block_count(out) == 5


def test_source_is_never_overwritten_and_must_exist(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "src.gguf")
    with pytest.raises(ExportError, match="refusing to overwrite the source"):
        export_gguf(src, [1], src)
    with pytest.raises(ExportError, match="does not exist"):
        export_gguf(tmp_path / "nope.gguf", [1], tmp_path / "out.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ExportError, match="not a readable GGUF"):
        export_gguf(tmp_path / "junk.gguf", [1], tmp_path / "out.gguf")


def test_index_derived_sliding_window_patterns_are_kept_or_refused(tmp_path: Path) -> None:
    # llama.cpp makes every 6th gemma3 layer full attention by index: dropping block 2 would shift
    # block 5 (full) into slot 4 (sliding)
    src = write_gguf(tmp_path / "g3.gguf", arch="gemma3", n_blocks=12)
    with pytest.raises(ExportError, match=r"original block 5 \(full-attention\) would run as block 4 \(sliding-window\)"):
        export_gguf(src, [2], tmp_path / "out.gguf")
    # a whole aligned period keeps every kept layer's type
    assert export_gguf(src, list(range(6)), tmp_path / "out.gguf").block_count_after == 6
    # a per-layer pattern array is sliced instead
    src2 = write_gguf(tmp_path / "g3b.gguf", arch="gemma3", n_blocks=6, extra={
        "gemma3.attention.sliding_window_pattern": ([True, True, False, True, True, False], gguf.GGUFValueType.ARRAY)})
    out = export_gguf(src2, [2], tmp_path / "out2.gguf").path
    assert gguf.GGUFReader(out).fields["gemma3.attention.sliding_window_pattern"].contents() == [True, True, True, True, False]


def test_refused_architectures_and_split_files(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "g3n.gguf", arch="gemma3n")
    with pytest.raises(ExportError, match="per_layer_token_embd"):
        export_gguf(src, [1], tmp_path / "out.gguf")
    split = write_gguf(tmp_path / "split.gguf", extra={"split.count": (2, gguf.GGUFValueType.UINT16)})
    with pytest.raises(ExportError, match="llama-gguf-split --merge"):
        export_gguf(split, [1], tmp_path / "out.gguf")
    big = write_gguf(tmp_path / "big.gguf", endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(ExportError, match="big-endian"):
        export_gguf(big, [1], tmp_path / "out.gguf")


def test_llamacpp_runner_says_how_to_install(tmp_path: Path) -> None:
    from skipit.runtime.llamacpp import find_node_llama_cpp, llamacpp_unavailable

    with pytest.raises(BackendUnavailableError, match="npm i -E node-llama-cpp@3.21.1"):
        find_node_llama_cpp(tmp_path)
    assert "npm i -E node-llama-cpp@3.21.1" in llamacpp_unavailable(tmp_path)


# --------------------------------------------------------------------------------------------------
# The real SmolLM2 GGUF, in torch and in llama.cpp
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slim_gguf(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    return export_gguf(smollm2_gguf, REMOVED, tmp_path_factory.mktemp("gguf") / "model.gguf")


@pytest.fixture(scope="module")
def torch_greedy(smollm2_gguf: Path) -> dict:
    """Greedy continuations of the dequantized torch model, before and after removing REMOVED
    (and, to show the comparison can fail, with two other blocks removed)."""
    import copy

    import torch

    from skipit.compressor.arch import decoder_spec
    from skipit.compressor.loading import load_model
    from skipit.compressor.rewrite import remove_layers_

    loaded = load_model(smollm2_gguf)
    tok = loaded.tokenizer
    tok.padding_side = "left"
    if tok.pad_token_id is None:  # transformers 4.57 builds SmolLM2's GGUF tokenizer without one; the mask hides it
        tok.pad_token = tok.eos_token
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    eos = loaded.model.generation_config.eos_token_id

    def run(model) -> list[list[int]]:
        """Greedy tokens per prompt (one left-padded batch), cut after the first EOS, which is kept."""
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        rows = out[:, batch["input_ids"].shape[1]:].tolist()
        return [row[:row.index(eos) + 1] if eos in row else row for row in rows]

    original = run(loaded.model)
    wrong = copy.deepcopy(loaded.model)
    remove_layers_(wrong, decoder_spec(wrong), [3, 25])
    remove_layers_(loaded.model, decoder_spec(loaded.model), REMOVED)
    return {"prompt_ids": [tok(p)["input_ids"] for p in PROMPTS], "original": original,
            "slim": run(loaded.model), "wrong": run(wrong), "layers": decoder_spec(loaded.model).num_layers}


@pytest.fixture(scope="module")
def llamacpp(smollm2_gguf: Path, slim_gguf) -> dict:
    """One node process: the original and the slim GGUF, the same text prompts."""
    from skipit.runtime.llamacpp import llamacpp_greedy, llamacpp_unavailable

    reason = llamacpp_unavailable(NODE_DIR)
    if reason:
        pytest.skip(f"llama.cpp is not available ({reason}); `make test` installs it into .node/")
    original, slim = llamacpp_greedy([smollm2_gguf, slim_gguf.path], PROMPTS, max_new_tokens=NEW_TOKENS,
                                     node_dir=NODE_DIR)
    return {"original": original, "slim": slim}


@pytest.mark.slow
def test_real_gguf_keeps_every_kept_tensor_and_field(smollm2_gguf: Path, slim_gguf) -> None:
    src, out = gguf.GGUFReader(smollm2_gguf), gguf.GGUFReader(slim_gguf.path)
    per_block = sum(1 for t in src.tensors if t.name.startswith("blk.0."))
    assert len(out.tensors) == len(src.tensors) - len(REMOVED) * per_block
    assert out.fields["llama.block_count"].contents() == 28
    old = {t.name: t for t in src.tensors}
    kept = [i for i in range(30) if i not in REMOVED]
    for t in out.tensors:
        name = t.name
        if name.startswith("blk."):
            i, rest = name.split(".", 2)[1:]
            name = f"blk.{kept[int(i)]}.{rest}"
        s = old[name]
        assert t.tensor_type == s.tensor_type, name
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(s.data).view(np.uint8)), name
    assert {t.tensor_type.name for t in out.tensors} == {"Q4_1", "Q8_0", "F32"}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "llama.rope.freq_base",
                "llama.context_length", "general.name", "tokenizer.ggml.eos_token_id"):
        a, b = src.fields[key], out.fields[key]
        assert [bytes(p) for p in a.parts[2:]] == [bytes(p) for p in b.parts[2:]], key
    assert slim_gguf.size_bytes < slim_gguf.source_size_bytes


@pytest.mark.slow
def test_llamacpp_sees_the_slim_layer_count_and_the_same_tokenizer(llamacpp, torch_greedy) -> None:
    original, slim = llamacpp["original"], llamacpp["slim"]
    assert (original.block_count, slim.block_count) == (30, 30 - len(REMOVED)) == (30, torch_greedy["layers"])
    assert slim.total_layers == original.total_layers - len(REMOVED)
    # llama.cpp tokenizes the prompts from the copied tokenizer metadata exactly as transformers does
    # (no BOS on either side for SmolLM2), so both sides continue the same token ids
    assert original.prompt_tokens == slim.prompt_tokens == torch_greedy["prompt_ids"]


@pytest.mark.slow
def test_slim_gguf_agrees_with_slim_torch_as_well_as_the_original_does(llamacpp, torch_greedy) -> None:
    from skipit.validators.compare import compare_generation

    orig = compare_generation(llamacpp["original"].tokens, torch_greedy["original"])
    slim = compare_generation(llamacpp["slim"].tokens, torch_greedy["slim"])
    wrong = compare_generation(llamacpp["slim"].tokens, torch_greedy["wrong"])
    changed = compare_generation(llamacpp["slim"].tokens, llamacpp["original"].tokens)
    print(f"greedy token agreement llama.cpp vs torch, {len(PROMPTS)} prompts × {NEW_TOKENS} tokens: "
          f"original {orig.token_match:.3f} (sequences {orig.sequence_match:.3f}), "
          f"slim {slim.token_match:.3f} (sequences {slim.sequence_match:.3f}); "
          f"slim GGUF vs torch with blocks 3, 25 removed instead: {wrong.token_match:.3f}; "
          f"slim vs original in llama.cpp: {changed.token_match:.3f}")
    assert orig.token_match >= 0.5, "the original GGUF itself disagrees with torch: the comparison is meaningless"
    assert slim.token_match >= orig.token_match - MARGIN
    # the measure tells removals apart: the slim GGUF is not the model with other blocks removed,
    # and removing blocks 16, 17 changed what llama.cpp generates
    assert wrong.token_match < slim.token_match - MARGIN
    assert changed.sequence_match < 1.0
