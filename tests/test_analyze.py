"""The scores see what they claim to see: an identity layer ranks most redundant and is certified;
a destructive layer is never certified. Text and VLM (vision tokens measured separately)."""

from __future__ import annotations

import pytest
import torch

from skipit.compressor.analyze import AnalyzeConfig, run_pass
from skipit.compressor.arch import decoder_spec
from skipit.compressor.calibration import load_calibration
from skipit.compressor.batches import encode
from skipit.compressor.certify import certify
from skipit.compressor.certificate import CertifyPolicy
from skipit.compressor.loading import load_model


def _setup(tiny_model_dir, arch: str):
    loaded = load_model(tiny_model_dir(arch))
    spec = decoder_spec(loaded.model)
    data = load_calibration(None, with_images=spec.is_vlm, limit=24)
    enc = lambda split: encode(data.split(split), loaded.processor, spec, batch_size=4, max_length=48)  # noqa: E731
    return loaded, spec, enc("calibration"), enc("holdout")


def _make_identity(layer: torch.nn.Module) -> None:
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "LlavaForConditionalGeneration"])
def test_identity_layer_ranks_first_and_is_certified(tiny_model_dir, arch: str) -> None:
    loaded, spec, cal, hold = _setup(tiny_model_dir, arch)
    _make_identity(spec.layers[3])
    result = run_pass(loaded.model, spec, cal, config=AnalyzeConfig())
    stats = {ls.index: ls for ls in result.layers}
    assert stats[3].metrics["text"]["cos_dist"].mean < 1e-5
    assert stats[3].metrics["text"]["lens_kl"].mean < 1e-5
    assert stats[3].metrics["text"]["tail"].mean == 0
    if spec.is_vlm:
        assert result.tokens["vision"] > 0
        assert stats[3].metrics["vision"]["cos_dist"].mean < 1e-5
        assert all(ls.metrics["vision"]["cos_dist"].n > 0 for ls in result.layers)
    combined = result.combined(candidates=range(1, 5), vision=spec.is_vlm)
    assert min(combined, key=combined.get) == 3
    cert = certify(loaded.model, spec, cal, hold, CertifyPolicy(max_kl=1e-4))
    assert cert.layers == [3]
    assert cert.holdout["kl"]["hi"] < 1e-4


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "LlavaForConditionalGeneration"])
def test_destructive_layer_is_never_certified(tiny_model_dir, arch: str) -> None:
    loaded, spec, cal, hold = _setup(tiny_model_dir, arch)
    _make_identity(spec.layers[2])
    with torch.no_grad():
        spec.layers[4].mlp.down_proj.weight.mul_(50.0)
    cert = certify(loaded.model, spec, cal, hold, CertifyPolicy(max_kl=None, max_layers=3))
    assert 4 not in cert.layers and 2 in cert.layers
    assert cert.order[0] == 2


def test_oracle_ranks_an_identity_layer_as_harmless(tiny_model_dir) -> None:
    from skipit.compressor.oracle import oracle

    loaded, spec, cal, hold = _setup(tiny_model_dir, "LlamaForCausalLM")
    _make_identity(spec.layers[2])
    result = oracle(loaded.model, spec, cal, hold, layers=[1, 2, 3, 4])
    assert result.damage[2]["kl"] < 1e-4 < min(result.damage[i]["kl"] for i in (1, 3, 4))  # fp16 reference floor ~2e-5
    assert set(result.spearman) >= {"geometric", "proximal", "informational", "combined"}
    assert -1 <= result.spearman["combined"] <= 1 and result.passes == 6
