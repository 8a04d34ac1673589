"""Every tiny builder writes a checkpoint that reloads with the plain Auto class and runs."""

from __future__ import annotations

import pytest
import torch
import tiny_models
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText


@pytest.mark.parametrize("arch", sorted(tiny_models.ARCHITECTURES))
def test_tiny_model_reloads_and_runs(arch: str, tiny_model_dir) -> None:
    model_dir = tiny_model_dir(arch)
    is_vlm = arch in tiny_models.VLM_ARCHS
    auto = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir).eval()
    assert type(model).__name__ == arch
    assert model.config.get_text_config().num_hidden_layers == len(tiny_models.LAYER_TYPES)

    image = Image.new("RGB", (40, 32), (200, 30, 90)) if is_vlm else None
    inputs = tiny_models.make_inputs(model_dir, "a tiny prompt", image)
    if is_vlm:
        assert (inputs["input_ids"] == model.config.image_token_id).sum() > 0
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(logits).all()
