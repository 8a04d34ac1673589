"""ONNX export of text decoders with KV cache (skipit.exporters.onnx), checked against torch.

Two tiny random models built from config here (no dependence on tiny_models.py):
* LlamaForCausalLM, 6 layers, tied embeddings — exported with the legacy (TorchScript) exporter;
* Qwen2ForCausalLM with mixed full / sliding-window layers (window 8), built with 6 layers and then
  rebuilt as a 4-layer checkpoint (layers deleted, layer_types sliced) — exported with dynamo.
Prompts are 12 tokens and decoding goes past position 13, so the sliding window really cuts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")

import torch  # noqa: E402
import transformers  # noqa: E402

from skipit.errors import BackendUnavailableError, ExportError, InvalidOptionError, OutputExistsError  # noqa: E402
from skipit.compat import cache_kwarg  # noqa: E402
from skipit.exporters.onnx import OnnxExportConfig, export_text_decoder, position_ids_from_mask  # noqa: E402
from skipit.exporters.onnx.optimum import optimum_available  # noqa: E402
from skipit.runtime.ort_text import OrtDecoderRunner  # noqa: E402

ATOL = 1e-4
SEED = 0
PROMPT_LEN = 12  # longer than the sliding window
COMMON = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.2,  # larger than the default 0.02: varied greedy tokens, windows that matter
)
QWEN2_LAYER_TYPES = ["full_attention", "sliding_attention", "sliding_attention",
                     "full_attention", "sliding_attention", "full_attention"]
QWEN2_KEEP = [0, 1, 4, 5]  # -> full, sliding, sliding, full


def _save(model: transformers.PreTrainedModel, out: Path) -> Path:
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out)
    return out


def build_llama(out: Path) -> Path:
    torch.manual_seed(SEED)
    cfg = transformers.LlamaConfig(**COMMON)
    return _save(transformers.LlamaForCausalLM(cfg).eval(), out)


def build_qwen2_slim(out: Path) -> Path:
    """6-layer Qwen2 with mixed layer types, then layers 2 and 3 deleted for good (4 layers saved)."""
    torch.manual_seed(SEED)
    cfg = transformers.Qwen2Config(**COMMON, layer_types=QWEN2_LAYER_TYPES, sliding_window=8,
                                   use_sliding_window=True, max_window_layers=0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in QWEN2_KEEP)
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx
    model.config.num_hidden_layers = len(QWEN2_KEEP)
    model.config.layer_types = [QWEN2_LAYER_TYPES[i] for i in QWEN2_KEEP]
    return _save(model, out)


# Every export route is checked by the same tests: skipit's own (legacy for Llama, dynamo for Qwen2)
# and, where optimum-onnx is installed (the transformers 4.57 environment, `make test-optimum`),
# optimum's exporter on the same checkpoints.
ROUTES = {"llama": OnnxExportConfig(exporter="legacy"), "qwen2_slim": OnnxExportConfig(exporter="dynamo")}
if optimum_available():
    ROUTES |= {f"{name}+optimum": OnnxExportConfig(backend="optimum") for name in ("llama", "qwen2_slim")}
BUILDERS = {"llama": build_llama, "qwen2_slim": build_qwen2_slim}
LLAMAS = [n for n in ROUTES if n.startswith("llama")]
QWENS = [n for n in ROUTES if n.startswith("qwen2_slim")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """route name -> (checkpoint dir, model.onnx), exported once per module."""
    root = tmp_path_factory.mktemp("onnx_text")
    ckpts = {name: build(root / name) for name, build in BUILDERS.items()}
    return {name: (ckpts[name.split("+")[0]], export_text_decoder(ckpts[name.split("+")[0]], root / f"{name}-onnx", config))
            for name, config in ROUTES.items()}


def _torch_model(ckpt: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def _prompt(batch: int = 1, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, COMMON["vocab_size"], size=(batch, PROMPT_LEN))


@pytest.mark.parametrize("name", list(ROUTES))
def test_prefill_and_cached_decode_match_torch(exported, name):
    ckpt, onnx_path = exported[name]
    model = _torch_model(ckpt)
    runner = OrtDecoderRunner(onnx_path)
    ids = _prompt()

    logits, present = runner.forward(ids)  # past of length 0
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), use_cache=True)
    assert present[0][0].shape == (1, 2, PROMPT_LEN, 16)
    assert np.abs(logits - ref.logits.numpy()).max() <= ATOL

    cache, mask = getattr(ref, cache_kwarg(model)), np.ones((1, PROMPT_LEN), np.int64)
    for step in range(2):  # two cached decode steps, present fed back as past
        nxt = logits[:, -1:].argmax(-1).astype(np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        logits, present = runner.forward(nxt, mask, past=present)
        with torch.no_grad():
            ref = model(torch.from_numpy(nxt), attention_mask=torch.from_numpy(mask), use_cache=True,
                        **{cache_kwarg(model): cache})
        cache = getattr(ref, cache_kwarg(model))
        err = np.abs(logits - ref.logits.numpy()).max()
        assert err <= ATOL, f"decode step {step}: max abs error {err}"
        assert present[0][0].shape[2] == PROMPT_LEN + step + 1


@pytest.mark.parametrize("name", list(ROUTES))
def test_greedy_generation_equals_torch_generate(exported, name):
    ckpt, onnx_path = exported[name]
    model = _torch_model(ckpt)
    ids = _prompt(seed=2)
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                             do_sample=False, max_new_tokens=8)
    out = OrtDecoderRunner(onnx_path).generate_greedy(ids, 8, eos_token_id=model.generation_config.eos_token_id)
    np.testing.assert_array_equal(out, ref.numpy())


@pytest.mark.parametrize("name", QWENS)
def test_left_padded_batch_matches_torch(exported, name):
    """Batch of 2, row 0 left-padded: real-token logits and greedy tokens equal torch's."""
    ckpt, onnx_path = exported[name]
    model = _torch_model(ckpt)
    ids = _prompt(batch=2, seed=3)
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    runner = OrtDecoderRunner(onnx_path)
    logits, _ = runner.forward(ids, mask)
    assert np.isfinite(logits).all()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(position_ids_from_mask(mask, PROMPT_LEN))).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(logits[real] - ref[real]).max() <= ATOL
    with torch.no_grad():
        gen = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                             max_new_tokens=6)
    out = runner.generate_greedy(ids, 6, attention_mask=mask, eos_token_id=model.generation_config.eos_token_id,
                                 pad_token_id=0)
    np.testing.assert_array_equal(out, gen.numpy())


def test_sliding_window_matters_for_these_prompts(exported):
    """Sensitivity of the parity tests: treating the sliding layers as full attention changes the
    logits far beyond ATOL, so a graph that ignored the window would fail them."""
    ckpt, _ = exported["qwen2_slim"]
    ids = torch.from_numpy(_prompt())
    full = transformers.AutoModelForCausalLM.from_pretrained(ckpt, layer_types=["full_attention"] * 4).eval()
    with torch.no_grad():
        diff = (_torch_model(ckpt)(ids).logits - full(ids).logits).abs().max().item()
    assert diff > 100 * ATOL


@pytest.mark.parametrize("name", list(ROUTES))
def test_graph_io_follows_config_and_convention(exported, name):
    import onnx

    layers = 6 if name.startswith("llama") else 4
    _, onnx_path = exported[name]
    graph = onnx.load(onnx_path, load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}
    kv_in = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids", *kv_in]
    assert list(outputs) == ["logits", *[f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]]
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    total = "past_sequence_length + sequence_length" if name.endswith("optimum") else "total_sequence_length"
    assert inputs["attention_mask"] == ["batch_size", total]
    assert inputs["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 16]
    assert outputs["logits"] == ["batch_size", "sequence_length", COMMON["vocab_size"]]
    assert outputs["present.0.value"][2].replace(" ", "") == "past_sequence_length+sequence_length"
    assert OrtDecoderRunner(onnx_path).num_layers == layers


def test_output_layout_for_optimum_and_transformers_js(exported):
    ckpt, onnx_path = exported["qwen2_slim"]
    out_dir = onnx_path.parent.parent
    assert onnx_path == out_dir / "onnx" / "model.onnx"
    assert json.loads((out_dir / "config.json").read_text())["num_hidden_layers"] == 4
    assert (out_dir / "generation_config.json").is_file()
    assert not list(out_dir.glob(".skipit-onnx-*")), "temporary folder left behind"


def test_dummy_past_slot_equals_empty_past(exported):
    """TensorRT's prefill workaround (one masked zero slot instead of past=0) gives the same logits."""
    from skipit.runtime.tensorrt import with_dummy_past

    _, onnx_path = exported["qwen2_slim"]
    runner = OrtDecoderRunner(onnx_path)
    ids = _prompt(seed=4)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "position_ids": np.arange(PROMPT_LEN, dtype=np.int64)[None]}
    for i, (k, v) in enumerate(runner.empty_past(1)):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k, v
    dummy = with_dummy_past(feed)
    assert dummy["past_key_values.0.key"].shape[2] == 1
    want = runner.session.run(["logits"], feed)[0]
    got = runner.session.run(["logits"], dummy)[0]
    assert np.abs(got - want).max() <= 1e-5


def test_refuses_existing_output(exported):
    ckpt, onnx_path = exported["llama"]
    with pytest.raises(OutputExistsError, match="overwrite"):
        export_text_decoder(ckpt, onnx_path.parent.parent, OnnxExportConfig(exporter="legacy"))


def test_auto_falls_back_to_legacy(exported, tmp_path, monkeypatch):
    import onnx

    from skipit.exporters.onnx import trace

    def broken(*args, **kwargs):
        raise RuntimeError("simulated data-dependent guard")

    monkeypatch.setattr(trace, "_dynamo", broken)
    ckpt, _ = exported["llama"]
    path = export_text_decoder(ckpt, tmp_path / "auto", OnnxExportConfig(exporter="auto"))
    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    assert meta["skipit.exporter"] == "legacy" and meta["skipit.num_hidden_layers"] == "6"
    with pytest.raises(ExportError, match="simulated"):
        export_text_decoder(ckpt, tmp_path / "dyn", OnnxExportConfig(exporter="dynamo"))


def test_bad_options_and_inputs(tmp_path):
    with pytest.raises(InvalidOptionError, match="dtype"):
        OnnxExportConfig(dtype="int4")
    with pytest.raises(InvalidOptionError, match="exporter"):
        OnnxExportConfig(exporter="tensorrt")
    with pytest.raises(ExportError, match="does not exist"):
        OrtDecoderRunner(tmp_path / "missing.onnx")
    from skipit.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="config.json"):
        export_text_decoder(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("name", [n for n in ROUTES if n.endswith("optimum")] or ["llama"])
def test_export_records_its_route(exported, name):
    import onnx

    _, onnx_path = exported[name]
    meta = {p.key: p.value for p in onnx.load(onnx_path, load_external_data=False).metadata_props}
    route = ROUTES[name].backend if name.endswith("optimum") else ROUTES[name].exporter
    assert meta["skipit.exporter"] == route
    assert meta["skipit.num_hidden_layers"] == ("6" if name.startswith("llama") else "4")


def test_optimum_backend_refusals(exported, tmp_path):
    """fp16 is refused up front; where optimum-onnx is missing (transformers 5.x) the error says how to get it."""
    with pytest.raises(InvalidOptionError, match="fp32"):
        OnnxExportConfig(backend="optimum", dtype="fp16")
    with pytest.raises(InvalidOptionError, match="backend"):
        OnnxExportConfig(backend="tensorrt")
    ckpt, _ = exported["llama"]
    if optimum_available():
        return  # exported above, through optimum, and checked like the other routes
    with pytest.raises(BackendUnavailableError, match=r"transformers<4\.58|4\.57\.6"):
        export_text_decoder(ckpt, tmp_path / "opt", OnnxExportConfig(backend="optimum"))
    assert not (tmp_path / "opt" / "onnx" / "model.onnx").exists()
