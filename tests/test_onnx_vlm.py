"""Split-graph ONNX export of VLMs (skipit.exporters.onnx), checked against torch end to end.

For each tiny VLM (6 decoder layers) layers 2 and 3 are removed for good with skipit's rewrite and the
4-layer checkpoint is exported to vision_encoder / embed_tokens / decoder_model_merged. With a fresh
random image the onnxruntime prefill logits and every cached decode step's logits must match torch within
1e-4, and greedy generation through the three graphs must equal torch ``generate(do_sample=False)``.

Exporter per architecture (CPU time budget): Qwen2-VL goes all through dynamo (the default route; it also
covers the 3-D multimodal-RoPE decoder input), the others through the legacy exporter (about 1 s per
graph instead of 5–25 s) — except Idefics3's vision graph, which only dynamo exports (its ``OnnxConfig`` falls
back to it, with a warning). export_vlm's own verification adds vision inputs of other image counts and
sizes than the trace used, and a left-padded prefill batch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tiny_models import VLM_ARCHS, make_inputs  # noqa: E402

from skipit.compat import TRANSFORMERS_MAJOR  # noqa: E402
from skipit.errors import ExportError, OutputExistsError, UnsupportedArchitectureError  # noqa: E402
from skipit.exporters.onnx import (  # noqa: E402
    DECODER_FILE,
    EMBED_FILE,
    VISION_FILE,
    OnnxExportConfig,
    export_vlm,
    kv_input_names,
)
from skipit.runtime.ort_vlm import OrtVlmRunner, mrope_position_ids  # noqa: E402

# VLM split graphs need transformers 5.x; under 4.57 (the optimum environment) only the refusal is tested.
needs_tx5 = pytest.mark.skipif(TRANSFORMERS_MAJOR < 5, reason="VLM split-graph export needs transformers 5.x")
ATOL = 1e-4
REMOVE = [2, 3]
KEPT_LAYERS = 4
NEW_TOKENS = 6
PROMPT = "what is in the picture?"
EXPORTER = {
    "LlavaForConditionalGeneration": "legacy",
    "Qwen2VLForConditionalGeneration": "dynamo",
    "Qwen2_5_VLForConditionalGeneration": "legacy",
    "Idefics3ForConditionalGeneration": "legacy",
}


def _slim_checkpoint(src: Path, out: Path) -> Path:
    """Load with skipit, remove layers 2 and 3 for good, save: the path the CLI takes."""
    from skipit.compressor.arch import decoder_spec
    from skipit.compressor.loading import load_model
    from skipit.compressor.rewrite import remove_layers_, save_checkpoint

    loaded = load_model(src)
    spec = decoder_spec(loaded.model)
    remove_layers_(loaded.model, spec, REMOVE)
    save_checkpoint(loaded.model, loaded.processor, src, out)
    return out


@pytest.fixture(scope="module", params=VLM_ARCHS)
def exported(request: pytest.FixtureRequest, tiny_model_dir, tmp_path_factory: pytest.TempPathFactory):
    """(arch, slim checkpoint, export dir, paths) — one export per architecture for the whole module."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"vlm-onnx-{arch}")
    slim = _slim_checkpoint(tiny_model_dir(arch), root / "slim")
    paths = export_vlm(slim, root / "out", OnnxExportConfig(exporter=EXPORTER[arch]))
    return arch, slim, root / "out", paths


@pytest.fixture(scope="module")
def reference(exported):
    """The slim checkpoint reloaded in torch, its processor inputs for a fresh random image, and the runner."""
    from skipit.compressor.loading import load_model

    arch, slim, out, _ = exported
    model = load_model(slim).model
    rng = np.random.default_rng(1234)
    image = Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8))
    inputs = make_inputs(slim, PROMPT, image)
    return model, inputs, OrtVlmRunner(out)


@needs_tx5
def test_layout_and_slim_kv_inputs(exported) -> None:
    """Three graphs under onnx/, config/tokenizer/processor beside them, and KV inputs for 4 layers only."""
    import onnx

    arch, slim, out, paths = exported
    assert set(paths) == {"vision_encoder", "embed_tokens", "decoder_model_merged"}
    for name in (VISION_FILE, EMBED_FILE, DECODER_FILE):
        assert (out / "onnx" / name).is_file()
    for name in ("config.json", "tokenizer.json", "processor_config.json"):
        assert (out / name).is_file(), name
    decoder = onnx.load(str(out / "onnx" / DECODER_FILE), load_external_data=False)
    inputs = [i.name for i in decoder.graph.input]
    assert inputs == ["inputs_embeds", "attention_mask", "position_ids", *kv_input_names(KEPT_LAYERS)]
    assert [o.name for o in decoder.graph.output][-1] == f"present.{KEPT_LAYERS - 1}.value"
    meta = {p.key: p.value for p in decoder.metadata_props}
    assert meta["skipit.num_hidden_layers"] == str(KEPT_LAYERS)
    vision = onnx.load(str(out / "onnx" / VISION_FILE), load_external_data=False)
    routes = {p.key: p.value for p in vision.metadata_props}
    assert routes["skipit.exporter"] == ("dynamo" if arch.startswith("Idefics3") else EXPORTER[arch])


@needs_tx5
def test_prefill_and_decode_logits_match_torch(reference) -> None:
    """Prefill logits, then each cached decode step's logits, against torch on the same token sequence."""
    model, inputs, runner = reference
    ids = inputs["input_ids"].numpy()
    mask = inputs["attention_mask"].numpy()
    logits, past, delta = runner.prefill(ids, inputs, mask)
    with torch.no_grad():
        ref = model(**inputs).logits.numpy()
    assert logits.shape == ref.shape
    assert float(np.abs(logits - ref).max()) <= ATOL

    # continue with tokens the model would not pick, through the cache, and compare with a full torch forward
    tokens = ids
    extra = np.array([[5], [77], [150]])
    for tok in extra:
        tokens = np.concatenate([tokens, tok[None]], axis=1)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        step, past = runner.decode_step(runner.embed(tok[None]), mask, runner.decode_positions(mask, delta), past)
        full = dict(inputs, input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask))
        if "mm_token_type_ids" in inputs:
            grown = tokens.shape[1] - ids.shape[1]
            full["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, grown))
        with torch.no_grad():
            ref_step = model(**full).logits[:, -1:].numpy()
        assert float(np.abs(step - ref_step).max()) <= ATOL


@needs_tx5
def test_greedy_generation_matches_torch(reference) -> None:
    model, inputs, runner = reference
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False).numpy()
    got = runner.generate_greedy(
        inputs["input_ids"].numpy(), inputs, NEW_TOKENS, attention_mask=inputs["attention_mask"].numpy(),
        eos_token_id=model.generation_config.eos_token_id, pad_token_id=model.generation_config.pad_token_id,
    )
    np.testing.assert_array_equal(got, expected)


@needs_tx5
def test_speed_runner_runs_text_prompts_through_the_split_graphs(reference) -> None:
    """measure_speed's ONNX Runtime runner on a VLM export: a text prompt through embeddings → decoder gives
    torch's logits, and the greedy loop from it gives the tokens the image-prompt path gives without images."""
    from skipit.runtime.base import greedy_decode
    from skipit.runtime.ort import OrtRunner

    model, _, runner = reference
    speed = OrtRunner(runner.out_dir, device="cpu")
    ids = np.arange(3, 11, dtype=np.int64)[None]
    logits, _ = speed.decoder.start(ids)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert float(np.abs(logits - ref).max()) <= ATOL
    np.testing.assert_array_equal(greedy_decode(speed.decoder, ids, 4), runner.generate_greedy(ids, None, 4))
    assert speed.prefill(ids) > 0 and speed.decode(ids, 3) > 0 and speed.peak_memory() is not None


@needs_tx5
def test_existing_export_is_not_overwritten(tiny_model_dir, tmp_path: Path) -> None:
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / DECODER_FILE).write_bytes(b"")
    with pytest.raises(OutputExistsError):
        export_vlm(tiny_model_dir("LlavaForConditionalGeneration"), tmp_path)


@needs_tx5
def test_text_only_checkpoint_is_refused(tiny_model_dir, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedArchitectureError, match="export_text_decoder"):
        export_vlm(tiny_model_dir("LlamaForCausalLM"), tmp_path / "out")


@needs_tx5  # 4.57's rope delta of a left-padded row counts the padding; the runner follows 5.x
def test_mrope_positions_match_get_rope_index(tiny_model_dir) -> None:
    """numpy port vs the model's get_rope_index: two images of different grids, a left-padded batch."""
    from skipit.compressor.loading import load_model

    model = load_model(tiny_model_dir("Qwen2VLForConditionalGeneration")).model
    cfg = model.config
    img, start, end = cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
    grid = torch.tensor([[1, 4, 6], [1, 2, 4], [1, 6, 4]])  # 6, 2 and 6 merged tokens
    row0 = [40, start, *[img] * 6, end, 41, start, *[img] * 2, end, 42]
    row1 = [43, start, *[img] * 6, end, *range(44, 56)]
    pad = len(row1) - len(row0)
    ids = torch.tensor([[0] * pad + row0, row1])
    mask = torch.tensor([[0] * pad + [1] * len(row0), [1] * len(row1)])
    types = (ids == img).int() * mask.int()
    ref_pos, ref_delta = model.model.get_rope_index(ids, types, image_grid_thw=grid, attention_mask=mask)
    pos, delta = mrope_position_ids(ids.numpy(), grid.numpy(), img, cfg.vision_config.spatial_merge_size, mask.numpy())
    keep = mask.numpy().astype(bool)
    np.testing.assert_array_equal(pos[:, keep], ref_pos.numpy()[:, keep])
    np.testing.assert_array_equal(delta, ref_delta.numpy())


def test_explicit_exporter_falls_back_per_graph_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Idefics3's vision graph has no legacy route: an explicit legacy export uses dynamo for it, and says so
    (test_layout_and_slim_kv_inputs checks the graph's recorded exporter)."""
    from skipit.exporters.onnx.archs import onnx_config

    arch = "Idefics3ForConditionalGeneration"
    legacy = OnnxExportConfig(exporter="legacy")
    with caplog.at_level(logging.WARNING, logger="skipit.exporters.onnx.archs"):
        assert onnx_config(arch).routes_for(arch, "vision", legacy) == ["dynamo"]
        assert onnx_config(arch).routes_for(arch, "decoder", legacy) == ["legacy"]
    assert "Unfold" in caplog.text


def test_every_registered_vlm_has_an_onnx_record_and_every_record_an_arch_spec() -> None:
    """One architecture registry: the export records are keyed by its names and cover exactly its VLMs."""
    from skipit.compressor.arch import REGISTRY
    from skipit.exporters.onnx import ONNX_CONFIGS, onnx_config

    vlms = {name for name, spec in REGISTRY.items() if spec.is_vlm}
    assert vlms == set(ONNX_CONFIGS)
    assert all(onnx_config(name).is_vlm for name in vlms)
    assert not onnx_config("LlamaForCausalLM").is_vlm and not onnx_config(None).is_vlm


@pytest.mark.skipif(TRANSFORMERS_MAJOR >= 5, reason="on transformers 5.x the export runs: the tests above")
def test_refused_clearly_on_transformers_4(tiny_model_dir, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="needs transformers 5"):
        export_vlm(tiny_model_dir("LlavaForConditionalGeneration"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
