"""Every registered text architecture, slimmed by skipit, exports to ONNX and matches torch in
onnxruntime: prefill and two cached decode steps within 1e-4 (fp32), and onnxruntime-genai generates
torch's greedy tokens from the folder as exported. VLMs: tests/test_onnx_vlm.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiny_models
import torch

from skipit.compressor.arch import decoder_spec
from skipit.compressor.loading import load_model
from skipit.compressor.rewrite import remove_layers_, save_checkpoint
from skipit.exporters.genai import genai_greedy
from skipit.exporters.onnx import OnnxExportConfig, export_text_decoder
from skipit.runtime.ort_text import OrtDecoderRunner

PROMPT = [[2, 40, 41, 60, 70, 80, 90, 100, 110, 120, 130, 140]]


@pytest.mark.parametrize("arch", tiny_models.TEXT_ARCHS)
def test_slim_text_model_onnx_matches_torch(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    loaded = load_model(tiny_model_dir(arch))
    spec = decoder_spec(loaded.model)
    remove_layers_(loaded.model, spec, [1, 3])
    save_checkpoint(loaded.model, loaded.processor, loaded.model_dir, tmp_path / "slim")
    # the legacy route is ~5x faster to trace here; the dynamo route is covered in test_onnx_text.py
    graph = export_text_decoder(tmp_path / "slim", tmp_path / "onnx", OnnxExportConfig(exporter="legacy"))
    runner = OrtDecoderRunner(graph)
    assert runner.num_layers == 4

    ids = torch.tensor(PROMPT)
    with torch.inference_mode():
        out = loaded.model(input_ids=ids, use_cache=True)
    logits, present = runner.forward(ids.numpy())
    assert np.abs(logits - out.logits.numpy()).max() <= 1e-4
    cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
    tokens = ids
    for _ in range(2):  # two cached decode steps, each fed the greedy token of the previous one
        nxt = torch.tensor([[int(logits[0, -1].argmax())]])
        tokens = torch.cat([tokens, nxt], dim=1)
        with torch.inference_mode():
            step = loaded.model(input_ids=nxt, past_key_values=cache, use_cache=True,
                                attention_mask=torch.ones_like(tokens))
        cache = step.past_key_values if getattr(step, "past_key_values", None) is not None else step.cache
        logits, present = runner.forward(nxt.numpy(), attention_mask=np.ones(tokens.shape, np.int64), past=present)
        assert np.abs(logits - step.logits.numpy()).max() <= 1e-4

    # onnxruntime-genai runs the folder as exported (its genai_config.json) with torch's greedy tokens
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed: pip install 'skipit[test]'")
    with torch.inference_mode():
        expected = loaded.model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert genai_greedy(graph.parent.parent, PROMPT[0], 8) == expected[0].tolist()
