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


@pytest.mark.parametrize("scaled", [False, True], ids=["llama", "granite-scaled-logits"])
def test_log_probs_taken_a_slice_at_a_time_equal_the_models_own(tiny_model_dir, monkeypatch, caplog, scaled: bool) -> None:
    """Passes read the final norm's output through the LM head a few tokens at a time (memory: one slice of
    logits, not the batch's); a model whose logits are not lm_head(norm(h)) — Granite divides them by
    ``logits_scaling`` — is noticed and measured from its own whole-batch logits instead."""
    import logging

    import transformers

    from skipit.compressor import textlogp

    loaded = load_model(tiny_model_dir("LlamaForCausalLM"))
    model, tokenizer = loaded.model, loaded.processor
    if scaled:
        cfg = model.config
        torch.manual_seed(0)
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(
            vocab_size=cfg.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, logits_scaling=4.0, pad_token_id=cfg.pad_token_id)).eval()
    spec = decoder_spec(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(textlogp, "CHUNK_BYTES", 4 * vocab * 7)  # 7 tokens per slice: several per batch
    data = load_calibration(None, limit=12)
    batches = encode(data.split("calibration") + data.split("holdout"), tokenizer, spec, batch_size=3, max_length=24)
    with caplog.at_level(logging.WARNING, logger=textlogp.__name__):
        ref = run_pass(model, spec, batches, keep_reference=True, layer_scores=False).reference
        div = run_pass(model, spec, batches, reference=ref, layer_scores=False).measured
    assert any("not its LM head" in r.getMessage() for r in caplog.records) == scaled
    assert textlogp.TextLogprobs(model, spec).sliced, "both models take logits_to_keep"
    text_tokens = 0
    with torch.inference_mode():
        for i, batch in enumerate(batches):
            full = torch.log_softmax(model(**batch.inputs, use_cache=False).logits.float()[batch.text_mask], -1)
            logp, top1 = ref[i]
            assert len(logp) == len(full) > 7
            assert torch.allclose(logp.float(), full, atol=1e-2, rtol=0) and torch.equal(top1, full.argmax(-1))
            text_tokens += len(full)
    assert div.kl.mean < 1e-4 and div.top1.mean == 1.0 and int(div.sample_counts[:, 0].sum()) == text_tokens


def test_logit_lens_reads_through_the_final_norm(tiny_model_dir) -> None:
    """The lens is lm_head(norm(h)): scaling the final norm's weight sharpens every lens distribution, so the
    lens KL between layers changes; a lens that skipped the norm would not see it."""
    loaded, spec, cal, _ = _setup(tiny_model_dir, "LlamaForCausalLM")
    before = [layer.score("informational") for layer in run_pass(loaded.model, spec, cal).layers]
    with torch.no_grad():
        spec.norm.weight.mul_(4.0)
    after = [layer.score("informational") for layer in run_pass(loaded.model, spec, cal).layers]
    assert all(abs(a - b) > 0.1 * b for a, b in zip(after, before)), (before, after)


def _screen(per_sample_kl: list[float], tokens: int = 50):
    import numpy as np

    from skipit.compressor.analyze import Divergence
    from skipit.compressor.stats import Estimate

    kl = np.asarray(per_sample_kl)
    est = Estimate(float(kl.mean()), float(kl.min()), float(kl.max()), len(kl))
    sums = np.zeros((len(kl), 3))
    sums[:, 0] = kl * tokens
    return Divergence(est, est, est, sample_sums=sums, sample_counts=np.full((len(kl), 2), tokens))


def test_a_screen_tie_is_judged_paired_over_the_screened_samples() -> None:
    from skipit.compressor.certify import _screen_tied

    last_in = _screen([0.90, 1.00, 0.80, 1.10])
    # 0.0001 above on average, differences of both signs: the screen cannot tell them apart
    assert _screen_tied(_screen([0.95, 0.95, 0.85, 1.0504]), last_in, 1.0)
    # above on every sample by the same margin: clearly worse however small the gap (no spread)
    assert not _screen_tied(_screen([0.91, 1.01, 0.81, 1.11]), last_in, 1.0)
    assert not _screen_tied(_screen([0.95, 0.95, 0.85, 1.0504]), last_in, 0.0), "0 turns the rule off"
    assert _screen_tied(_screen([5.0]), _screen([1.0]), 1.0), "one sample: no spread to judge by"
