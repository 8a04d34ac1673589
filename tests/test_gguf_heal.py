"""GGUF out after healing: kept tensors written from (trained) Hugging Face weights, re-quantized to their
own GGML type (F16 where the gguf package cannot write that type), every other tensor byte for byte.

* The layout transform is checked against transformers itself: on SmolLM2 (llama) for every tensor kind of
  a block, both directions are exact; for every supported architecture, against transformers' tensor
  processor and its GGUF↔HF name map (tiny models built from config).
* SmolLM2 Q4_1 with blocks 16, 17 removed and the neighbours 15, 18 (the layers healing trains) replaced
  by their weights + N(0, 2e-3) noise: reloaded by transformers, those tensors equal the given weights
  within Q4_1's rounding (per 32-value block: half a step, (max − min) / 15 / 2, plus the fp16 rounding of
  the block's scale and minimum), norms exactly (F32), every other tensor bit-identical.
* llama.cpp runs it; and zeroing block 18's output projections (attn_output, ffn_down: the block then adds
  nothing to the residual stream) gives exactly the tokens of the GGUF with block 18 removed, so the
  replaced tensors land in the block they name, in llama.cpp too.
* The F16 path on a GGUF written here with a Q4_K tensor (built from raw blocks: gguf dequantizes K-quants
  but cannot quantize them), and ``replace_type`` (the matrices in a finer type than the source's).

Q4_1 re-quantization rounds most of a small change back to the source's values (``change_kept`` 0.065 for
the noise here; measured with real healing of SmolLM2 — blocks 12, 13, 14, 26 removed, 40 steps — held-out
KL 0.730 unhealed, 0.462 healed, 0.691 with the trained tensors re-quantized to Q4_1, 0.463 as Q8_0).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from test_gguf_out import NEW_TOKENS, PROMPTS  # the same llama.cpp prompts as the unhealed GGUF checks

from skipit.errors import ExportError
from skipit.exporters.gguf import export_gguf, slim_model_tensors
from skipit.exporters.gguf_tensors import SUPPORTED, arch_tensors, gguf_name_map, permute_qk, unpermute_qk

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
NODE_DIR = Path(os.environ.get("SKIPIT_NODE_DIR") or REPO / ".node")
REMOVED = [16, 17]
TRAINED = [15, 18]  # healing's default: one kept layer on each side of the gap (original numbering)
NOISE = 2e-3  # simulated healing: about what 80 AdamW steps at lr 1e-4 move a weight
KINDS = {  # HF module → GGUF tensor, for one llama block
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _dequant(t) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)


def _q4_1_bound(values: np.ndarray) -> np.ndarray:
    """Per value, the most Q4_1 rounding can move it: half a step of its 32-value block, plus the fp16
    rounding of the block's scale d = (max − min) / 15 (times at most 15 steps) and minimum."""
    blocks = values.reshape(-1, 32).astype(np.float64)
    lo, hi = blocks.min(1, keepdims=True), blocks.max(1, keepdims=True)
    d = (hi - lo) / 15
    bound = d / 2 + 2.0 ** -11 * (15 * d + np.abs(lo)) + 1e-7
    return np.broadcast_to(bound, blocks.shape).reshape(values.shape)


# --------------------------------------------------------------------------------------------------
# The real SmolLM2 GGUF
# --------------------------------------------------------------------------------------------------
def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


@pytest.fixture(scope="module")
def source_state(smollm2_gguf: Path) -> dict:
    """The HF weights transformers loads from the source GGUF (the one SmolLM2 load of this module)."""
    return {k: v.detach().clone() for k, v in _load(smollm2_gguf).state_dict().items()}


@pytest.fixture(scope="module")
def healed(smollm2_gguf: Path, source_state: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Blocks 16, 17 removed; every tensor of blocks 15 and 18 replaced by its HF weight + noise."""
    rng = np.random.default_rng(0)
    given = {}
    for block in TRAINED:
        for module in KINDS:
            name = f"model.layers.{block}.{module}.weight"
            w = source_state[name]
            given[name] = w + torch.from_numpy(rng.standard_normal(w.shape).astype(np.float32)) * NOISE
    out = tmp_path_factory.mktemp("healed") / "model.gguf"
    return {"result": export_gguf(smollm2_gguf, REMOVED, out, replace=given), "given": given}


@pytest.fixture(scope="module")
def reloaded(healed: dict) -> dict:
    return _load(healed["result"].path).state_dict()


@pytest.mark.slow
def test_layout_transform_round_trips_every_tensor_kind_of_a_block(smollm2_gguf: Path, source_state: dict) -> None:
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    reader = gguf.GGUFReader(smollm2_gguf)
    tensors = {t.name: t for t in reader.tensors}
    transforms = arch_tensors("llama", reader.fields)
    processor = TENSOR_PROCESSORS["llama"](config={"num_attention_heads": 9, "num_key_value_heads": 3})
    lookup = gguf_name_map("llama", 30, gguf)
    for module, kind in KINDS.items():
        hf_name, gname = f"model.layers.7.{module}.weight", f"blk.7.{kind}.weight"
        assert lookup(hf_name) == gname
        stored, hf = _dequant(tensors[gname]), source_state[hf_name].numpy()
        # transformers' direction: the dequantized GGUF tensor through its processor is what it loads
        np.testing.assert_array_equal(processor.process(stored, gname).weights, hf)
        # ours: the HF tensor back to the stored values (a reordering of rows for Q/K: exact)
        np.testing.assert_array_equal(transforms.to_gguf(gname, hf, 7), stored)
        np.testing.assert_array_equal(transforms.to_hf(gname, stored, 7), hf)
    # the permutation is not the identity: Q/K written without it would be a different model
    q = source_state["model.layers.7.self_attn.q_proj.weight"].numpy()
    assert not np.array_equal(permute_qk(q, 9), q)


@pytest.mark.slow
def test_healed_tensors_reload_within_quantization_error_and_the_rest_bit_identical(
        smollm2_gguf: Path, source_state: dict, healed: dict, reloaded: dict) -> None:
    result, given = healed["result"], healed["given"]
    assert result.block_count_after == 28
    record = result.healed
    assert record["tensors"] == 18 and record["blocks"] == TRAINED
    assert record["written_types"] == {"F32": 4, "Q4_1": 14} and record["f16_fallback"] == {}
    assert record["type"] == "source" and record["change_kept"] < 0.5  # Q4_1 rounds most of the noise away
    assert result.as_dict()["healed"] == record
    new_of = {old: new for new, old in enumerate(i for i in range(30) if i not in REMOVED)}
    worst = 0.0
    for name, w in given.items():
        block, rest = int(name.split(".")[2]), name.split(".", 3)[3]
        got = reloaded[f"model.layers.{new_of[block]}.{rest}"].numpy()
        w = w.numpy()
        if w.ndim == 1:
            np.testing.assert_array_equal(got, w)  # norms are F32 in the source: written as given
            continue
        err = np.abs(got - w)
        assert (err <= _q4_1_bound(w)).all(), name
        assert err.max() > 0  # re-quantized, not copied
        worst = max(worst, float(err.max()))
    print(f"Q4_1 re-quantization of 14 weights (+ N(0, {NOISE}) noise): max |err| {record['requant_error']['max_abs']:.4g}, "
          f"mean {record['requant_error']['mean_abs']:.3g}; largest change {record['largest_change']}; "
          f"share of the change kept {record['change_kept']:.3f}")
    assert worst == pytest.approx(record["requant_error"]["max_abs"], rel=1e-5)
    # every other tensor: the bytes of the source, and transformers loads the very same values
    src = {t.name: t for t in gguf.GGUFReader(smollm2_gguf).tensors}
    out = gguf.GGUFReader(result.path)
    assert out.fields["llama.block_count"].contents() == 28
    kept = [i for i in range(30) if i not in REMOVED]
    untouched = 0
    for t in out.tensors:
        part = t.name.split(".", 2)
        name = f"blk.{kept[int(part[1])]}.{part[2]}" if part[0] == "blk" else t.name
        assert t.tensor_type == src[name].tensor_type, t.name  # Q4_1 stays Q4_1, F32 stays F32
        if part[0] == "blk" and kept[int(part[1])] in TRAINED:
            continue
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(src[name].data).view(np.uint8)), t.name
        untouched += 1
    assert untouched == len(out.tensors) - 18
    for old in (0, 14, 19, 29):
        for module in KINDS:
            assert torch.equal(reloaded[f"model.layers.{new_of[old]}.{module}.weight"],
                               source_state[f"model.layers.{old}.{module}.weight"])


@pytest.mark.slow
def test_a_slim_model_name_is_refused(smollm2_gguf: Path, source_state: dict, tmp_path: Path) -> None:
    # the slip: the slim model's layer 18 (original block 20, here unhealed) passed under its slim name,
    # e.g. {name: slim_state[name] for name in healing["tensors"]}
    slip = {"model.layers.18.mlp.up_proj.weight": source_state["model.layers.20.mlp.up_proj.weight"]}
    with pytest.raises(ExportError, match=r"far closer to blk\.20\.ffn_up\.weight .* ORIGINAL layer numbering"):
        export_gguf(smollm2_gguf, REMOVED, tmp_path / "model.gguf", replace=slip)
    assert not (tmp_path / "model.gguf").exists()


@pytest.fixture(scope="module")
def llamacpp(smollm2_gguf: Path, source_state: dict, healed: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One node process: the healed GGUF; block 18's output projections zeroed; block 18 removed."""
    from skipit.runtime.llamacpp import llamacpp_greedy, llamacpp_unavailable

    reason = llamacpp_unavailable(NODE_DIR)
    if reason:
        pytest.skip(f"llama.cpp is not available ({reason}); `make test` installs it into .node/")
    folder = tmp_path_factory.mktemp("llamacpp")
    zeros = {f"model.layers.18.{m}.weight": torch.zeros_like(source_state[f"model.layers.18.{m}.weight"])
             for m in ("self_attn.o_proj", "mlp.down_proj")}
    # as Q8_0 (zero is exact in any type): llama.cpp also runs Q8_0 replacements in a Q4_1 file
    zeroed = export_gguf(smollm2_gguf, REMOVED, folder / "zeroed.gguf", replace=zeros, replace_type="Q8_0").path
    without = export_gguf(smollm2_gguf, [*REMOVED, 18], folder / "without18.gguf").path
    runs = llamacpp_greedy([healed["result"].path, zeroed, without], PROMPTS, max_new_tokens=NEW_TOKENS,
                           node_dir=NODE_DIR)
    return dict(zip(("healed", "zeroed", "without"), runs))


@pytest.mark.slow
def test_llamacpp_runs_the_healed_gguf_and_the_replacements_land_in_their_block(llamacpp) -> None:
    healed, zeroed, without = llamacpp["healed"], llamacpp["zeroed"], llamacpp["without"]
    assert (healed.block_count, zeroed.block_count, without.block_count) == (28, 28, 27)
    assert all(len(t) > 0 for t in healed.tokens) and any(s.strip() for s in healed.texts)
    # a block whose attn_output and ffn_down are zero adds nothing to the residual stream: the same
    # computation as without the block, token for token
    assert zeroed.tokens == without.tokens
    # and that block matters: without it, llama.cpp continues differently from the 28-block model
    assert without.tokens != healed.tokens
    print("healed GGUF in llama.cpp:", [t[:40] for t in healed.texts[:3]])


# --------------------------------------------------------------------------------------------------
# Small GGUFs written here: the F16 fallback, BF16, a refused architecture
# --------------------------------------------------------------------------------------------------
HIDDEN, HEADS, KV_HEADS = 256, 4, 2  # K-quant rows are 256 values long


def _q4_k_bytes(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K blocks (d, dmin as fp16, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles)."""
    n = rows * cols // 256
    blocks = rng.integers(0, 256, size=(n, 144), dtype=np.uint8)
    blocks[:, 0:2] = np.full((n, 1), 0.004, dtype=np.float16).view(np.uint8)
    blocks[:, 2:4] = np.full((n, 1), 0.002, dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, cols // 256 * 144)


def _tiny_gguf(path: Path, arch: str = "llama", n_blocks: int = 3) -> Path:
    rng = np.random.default_rng(1)
    q = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(path, arch)
    w.add_uint32(f"{arch}.block_count", n_blocks)
    w.add_uint32(f"{arch}.attention.head_count", HEADS)
    w.add_uint32(f"{arch}.attention.head_count_kv", KV_HEADS)
    w.add_tensor("token_embd.weight", rng.standard_normal((8, HIDDEN)).astype(np.float32))
    kv = HIDDEN // HEADS * KV_HEADS
    for i in range(n_blocks):
        raw = _q4_k_bytes(HIDDEN, HIDDEN, rng)
        w.add_tensor(f"blk.{i}.attn_q.weight", raw, raw_shape=raw.shape, raw_dtype=q.Q4_K)
        for name, rows, qtype in (("attn_k", kv, q.Q8_0), ("attn_v", kv, q.Q5_0), ("attn_output", HIDDEN, q.BF16)):
            data = gguf.quants.quantize((rng.standard_normal((rows, HIDDEN)) * 0.05).astype(np.float32), qtype)
            w.add_tensor(f"blk.{i}.{name}.weight", data, raw_shape=data.shape, raw_dtype=qtype)
        w.add_tensor(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_k_quant_tensors_are_written_as_f16_and_the_rest_in_their_own_type(tmp_path: Path) -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    src = _tiny_gguf(tmp_path / "src.gguf")
    stored = {t.name: t for t in gguf.GGUFReader(src).tensors}
    assert stored["blk.1.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_K
    processor = LlamaTensorProcessor(config={"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS})
    rng = np.random.default_rng(2)
    hf_names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm"}
    given = {}
    for kind, module in hf_names.items():  # block 1, as transformers would load it, + "healing"
        gname = f"blk.1.{kind}.weight"
        hf = processor.process(_dequant(stored[gname]), gname).weights
        given[f"model.layers.1.{module}.weight"] = torch.from_numpy(
            (hf + 1e-3 * rng.standard_normal(hf.shape)).astype(np.float32))
    result = export_gguf(src, [0], tmp_path / "out.gguf", replace=given)
    record = result.healed
    assert record["written_types"] == {"BF16": 1, "F16": 1, "F32": 1, "Q5_0": 1, "Q8_0": 1}
    assert list(record["f16_fallback"]) == ["blk.0.attn_q.weight"]  # output name: block 1 is block 0 now
    assert "Q4_K → F16" in record["f16_fallback"]["blk.0.attn_q.weight"]
    assert "cannot quantize Q4_K" in record["f16_fallback"]["blk.0.attn_q.weight"]
    out = {t.name: t for t in gguf.GGUFReader(result.path).tensors}
    assert out["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert [int(x) for x in out["blk.0.attn_q.weight"].shape] == [HIDDEN, HIDDEN]
    q_hf = given["model.layers.1.self_attn.q_proj.weight"].numpy()
    # F16 holds the permuted given weights to fp16 rounding; transformers' processor undoes the permutation
    np.testing.assert_array_equal(_dequant(out["blk.0.attn_q.weight"]), permute_qk(q_hf, HEADS).astype(np.float16))
    np.testing.assert_allclose(processor.process(_dequant(out["blk.0.attn_q.weight"]), "blk.0.attn_q.weight").weights,
                               q_hf, rtol=2 ** -11, atol=1e-7)
    for kind, module, tol in (("attn_k", "self_attn.k_proj", 1 / 127), ("attn_v", "self_attn.v_proj", 1 / 15),
                              ("attn_output", "self_attn.o_proj", 2 ** -8)):
        hf = given[f"model.layers.1.{module}.weight"].numpy()
        got = processor.process(_dequant(out[f"blk.0.{kind}.weight"]), f"blk.0.{kind}.weight").weights
        assert out[f"blk.0.{kind}.weight"].tensor_type == stored[f"blk.1.{kind}.weight"].tensor_type
        assert np.abs(got - hf).max() <= tol * np.abs(hf).max(), kind  # within one step of its block's scale
    np.testing.assert_array_equal(_dequant(out["blk.0.attn_norm.weight"]), given["model.layers.1.input_layernorm.weight"])
    # block 2 (now 1) untouched, Q4_K bytes and all
    for kind in hf_names:
        a, b = out[f"blk.1.{kind}.weight"], stored[f"blk.2.{kind}.weight"]
        assert a.tensor_type == b.tensor_type
        assert np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8))


def test_replace_type_writes_the_matrices_in_a_finer_type(tmp_path: Path) -> None:
    src = _tiny_gguf(tmp_path / "src.gguf")
    stored = {t.name: t for t in gguf.GGUFReader(src).tensors}
    q_hf = unpermute_qk(_dequant(stored["blk.1.attn_q.weight"]), HEADS)
    given = {"model.layers.1.self_attn.q_proj.weight": q_hf + 1e-3,
             "model.layers.1.input_layernorm.weight": _dequant(stored["blk.1.attn_norm.weight"]) + 1e-3}
    record = export_gguf(src, [0], tmp_path / "out.gguf", replace=given, replace_type="q8_0").healed
    assert record["type"] == "Q8_0" and record["written_types"] == {"F32": 1, "Q8_0": 1}
    assert record["f16_fallback"] == {} and record["change_kept"] > 0.5
    out = {t.name: t for t in gguf.GGUFReader(tmp_path / "out.gguf").tensors}
    assert out["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert out["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # 1-D keeps its type
    for bad, message in (("Q4_K", r"cannot write trained tensors as 'Q4_K': gguf [\d.]+ writes .*Q8_0"),
                         ("Q9_9", "cannot write trained tensors as 'Q9_9'")):
        with pytest.raises(ExportError, match=message):
            export_gguf(src, [0], tmp_path / "out2.gguf", replace=given, replace_type=bad)


def test_replacements_that_do_not_fit_a_kept_tensor_are_refused(tmp_path: Path) -> None:
    src = _tiny_gguf(tmp_path / "src.gguf")
    out = tmp_path / "out.gguf"
    q = torch.zeros(HIDDEN, HIDDEN)
    cases = [
        ({"model.layers.0.self_attn.q_proj.weight": q}, r"is for block 0, which is being removed; keys are .* ORIGINAL"),
        ({"model.layers.1.self_attn.k_proj.weight": q}, r"has shape \[256, 256\], but blk\.1\.attn_k\.weight .* holds \[128, 256\]"),
        ({"lm_head.weight": torch.zeros(8, HIDDEN)}, r"gguf's name map gives output\.weight, which the file does not hold"),
        ({"model.layers.1.mlp.nonsense.weight": q}, r"no tensor of src\.gguf corresponds"),
        ({"model.layers.1.self_attn.q_proj.weight": q, "layers.1.self_attn.q_proj.weight": q}, "both name blk.1.attn_q.weight"),
        ({"model.layers.1.self_attn.q_proj.weight": q * float("nan")}, "NaN or infinite"),
    ]
    for replace, message in cases:
        with pytest.raises(ExportError, match=message):
            export_gguf(src, [0], out, replace=replace)
    assert not out.exists()


def test_architectures_without_an_inverse_are_refused_but_still_export_unhealed(tmp_path: Path) -> None:
    src = _tiny_gguf(tmp_path / "phi3.gguf", arch="phi3")
    value = torch.zeros(HIDDEN, HIDDEN)
    with pytest.raises(ExportError, match=r"cannot write trained \(healed\) tensors into a phi3 GGUF.*gemma2, gemma3, "
                                          r"llama, qwen2, qwen3.*safetensors checkpoint"):
        export_gguf(src, [0], tmp_path / "out.gguf", replace={"model.layers.1.self_attn.q_proj.weight": value})
    assert not (tmp_path / "out.gguf").exists()
    assert export_gguf(src, [0], tmp_path / "out.gguf").healed is None
    assert "healed" not in export_gguf(src, [0], tmp_path / "out.gguf", replace={}).as_dict()


@pytest.mark.parametrize("arch, tiny", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
                                        ("qwen3", "Qwen3ForCausalLM"), ("gemma2", "Gemma2ForCausalLM"),
                                        ("gemma3", "Gemma3ForCausalLM")])
def test_every_supported_architecture_inverts_transformers(arch: str, tiny: str) -> None:
    """Names: our HF → GGUF map is the inverse of the GGUF → HF map transformers loads with, for every
    parameter of a tiny model of the class. Values: transformers' tensor processor for the architecture
    (the one SUPPORTED names) undoes our transform on every block tensor."""
    import tiny_models
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    assert set(SUPPORTED) == {"llama", "qwen2", "qwen3", "gemma2", "gemma3"}
    config = tiny_models.build_config(tiny, tiny_models.build_tokenizer())
    model = AutoModelForCausalLM.from_config(config)
    processor_cls = TENSOR_PROCESSORS.get(arch, TensorProcessor)
    assert processor_cls.__name__ == SUPPORTED[arch]
    processor = processor_cls(config={"num_attention_heads": config.num_attention_heads,
                                      "num_key_value_heads": config.num_key_value_heads})
    to_hf = get_gguf_hf_weights_map(model, processor)
    lookup = gguf_name_map(arch, config.num_hidden_layers, gguf)
    fields = {f"{arch}.attention.head_count": config.num_attention_heads,
              f"{arch}.attention.head_count_kv": config.num_key_value_heads}
    transforms = arch_tensors(arch, {k: _Field(v) for k, v in fields.items()})
    rng = np.random.default_rng(3)
    checked = 0
    for hf_name, param in model.named_parameters():
        if ".layers." not in hf_name:
            continue
        gname = lookup(hf_name)
        assert gname is not None and to_hf[gname] == hf_name, hf_name
        hf = rng.standard_normal(tuple(param.shape)).astype(np.float32)
        back = processor.process(transforms.to_gguf(gname, hf, 0), gname).weights
        np.testing.assert_allclose(back, hf, rtol=0, atol=1e-6, err_msg=gname)
        np.testing.assert_allclose(transforms.to_hf(gname, transforms.to_gguf(gname, hf, 0), 0), hf, rtol=0, atol=1e-6)
        checked += 1
    assert checked == len([n for n, _ in model.named_parameters() if ".layers." in n]) > 0


class _Field:
    """Stands in for a gguf ReaderField (``contents()``) in the tiny-model check above."""

    def __init__(self, value) -> None:
        self.value = value

    def contents(self):
        return self.value


def test_slim_model_tensors_reads_original_names_from_the_renumbered_model() -> None:
    class Block(torch.nn.Module):
        def __init__(self, tag: float) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(2, 2, bias=False)
            torch.nn.init.constant_(self.proj.weight, tag)

    class Inner(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(Block(tag) for tag in (0, 3, 5, 6))  # original 0, 3, 5, 6 kept

    class Slim(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Inner()

    got = slim_model_tensors(Slim(), [4, 1, 2], ["model.layers.3.proj.weight", "model.layers.5.proj.weight",
                                                 "model.layers.0.proj.weight"])
    assert {k: float(v[0, 0].detach()) for k, v in got.items()} == {"model.layers.3.proj.weight": 3.0,
                                                           "model.layers.5.proj.weight": 5.0,
                                                           "model.layers.0.proj.weight": 0.0}
    with pytest.raises(ExportError, match="removed layer 2"):
        slim_model_tensors(Slim(), [4, 1, 2], ["model.layers.2.proj.weight"])
    with pytest.raises(ExportError, match="no parameter model.layers.4.proj.weight"):
        slim_model_tensors(Slim(), [1, 2, 3], ["model.layers.7.proj.weight"])
