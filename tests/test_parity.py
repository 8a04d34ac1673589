"""Parity of original vs slim (KL, agreement, perplexity, generation, accuracy) with paired intervals,
and the backend comparators that report the tolerance that would have been needed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from skipit.compressor.arch import decoder_spec
from skipit.compressor.calibration import Sample
from skipit.compressor.loading import load_model
from skipit.compressor.rewrite import remove_layers_
from skipit.compressor.stats import bootstrap_quantile
from skipit.errors import MissingAnswersError
from skipit.validators.generation import answer_matches, normalize_answer
from skipit.validators.parity import ParityConfig, check_parity, compare_generation, compare_logits, generation_parity

ARCH = "LlamaForCausalLM"
CONFIG = ParityConfig(n_boot=200, new_tokens=6, batch_size=4, max_length=48)
SAMPLES = [Sample(f"Line {i}: the quick brown fox jumps over the lazy dog near river {i}.",
                  answer="fox" if i % 2 else None) for i in range(8)]


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """(original, identical copy, copy without layer 2) of the tiny Llama."""
    original, same, slim = (load_model(tiny_model_dir(ARCH)) for _ in range(3))
    remove_layers_(slim.model, decoder_spec(slim.model), [2])
    return original, same, slim


@pytest.fixture(scope="module")
def identical(models):
    original, same, _ = models
    return check_parity(original.model, same.model, SAMPLES, original.processor, CONFIG)


@pytest.fixture(scope="module")
def removed(models):
    original, _, slim = models
    return check_parity(original.model, slim.model, SAMPLES, original.processor, CONFIG)


def _inside(est) -> bool:
    return est.lo <= est.mean <= est.hi


def test_identical_models_agree_perfectly(identical) -> None:
    lg, gen = identical.logits, identical.generation
    # KL is measured against the original's log-probs stored in fp16: identical models score exactly
    # that rounding floor, which the report gives so that a small KL can be read against it.
    assert lg.kl.mean == pytest.approx(lg.kl_floor.mean, rel=1e-9, abs=1e-12)
    assert lg.kl.mean < 1e-4
    assert lg.top1.mean == 1.0 and lg.top1.lo == 1.0
    assert lg.ppl_ratio.mean == pytest.approx(1.0, abs=1e-12) and lg.ppl_original.mean == lg.ppl_slim.mean
    assert gen.token_match.mean == 1.0 and gen.sequence_match.mean == 1.0
    assert gen.answered == 4 and gen.accuracy_delta.mean == 0.0
    assert lg.samples == len(SAMPLES) and lg.tokens > 0


def test_removed_layer_changes_the_output(removed, identical) -> None:
    lg = removed.logits
    assert lg.kl.mean > 10 * identical.logits.kl_floor.mean and lg.kl.lo > 0
    assert lg.top1.mean < 1.0
    assert lg.kl_quantile.mean >= lg.kl.mean * 0.5 > 0  # a tail quantile, not zero
    assert lg.ppl_original.mean == pytest.approx(identical.logits.ppl_original.mean)  # the same original


def test_paired_intervals_contain_the_estimate(removed) -> None:
    lg, gen = removed.logits, removed.generation
    for est in (lg.kl, lg.kl_quantile, lg.top1, lg.ppl_original, lg.ppl_slim, lg.ppl_ratio,
                gen.token_match, gen.sequence_match, gen.accuracy_original, gen.accuracy_slim, gen.accuracy_delta):
        assert _inside(est), est
    # paired: the ratio is computed per draw from the same samples, so it equals the ratio of the means
    assert lg.ppl_ratio.mean == pytest.approx(lg.ppl_slim.mean / lg.ppl_original.mean, rel=1e-9)
    assert gen.accuracy_delta.mean == pytest.approx(gen.accuracy_slim.mean - gen.accuracy_original.mean)
    json.dumps(removed.as_dict())


def test_accuracy_requested_without_answers_is_a_clear_error(models) -> None:
    original, same, _ = models
    plain = [Sample(s.text) for s in SAMPLES]
    with pytest.raises(MissingAnswersError, match="answer"):
        generation_parity(original.model, same.model, plain, original.processor, ParityConfig(accuracy=True))
    with pytest.raises(MissingAnswersError, match="answer"):  # before any forward pass
        check_parity(original.model, same.model, plain, original.processor, ParityConfig(accuracy=True))


def test_answer_matching() -> None:
    assert normalize_answer("  The Blue sky!\nmore") == "blue sky"
    assert answer_matches(" Blue. The sky is", "blue")
    assert answer_matches("a red car, parked", "Red car")
    assert not answer_matches("blueish", "blue")
    assert not answer_matches("anything", "")


def test_compare_logits_reports_the_needed_tolerance() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(3, 5, 11)).astype(np.float32)
    ref[..., 0] = 2.0  # a positive element with known magnitude
    ref[1, 2] = 0.0
    ref[1, 2, 3] = 1.0  # argmax of row (1, 2) is 3, by a margin of 1.0
    cand = ref.copy()
    cand[0, 0, 0] += 0.01  # relative error 0.005
    cand[1, 2, 4] += 1.5  # flips the argmax of one of 15 rows
    cmp = compare_logits(cand, ref, atol=1e-3)
    assert not cmp and cmp.max_abs == pytest.approx(1.5, abs=1e-6)
    assert cmp.required_atol == cmp.max_abs
    assert cmp.top1_agreement == pytest.approx(14 / 15)
    assert cmp.max_rel == np.inf  # 1.5 over a reference of 0
    assert cmp.mean_abs == pytest.approx((0.01 + 1.5) / ref.size, rel=1e-4)
    assert compare_logits(cand, ref, atol=1.6)
    small = compare_logits(ref + np.float32(1e-5), ref, atol=1e-4)
    assert small and small.top1_agreement == 1.0 and small.max_abs == pytest.approx(1e-5, rel=0.05)
    one = ref.copy()
    one[0, 0, 0] += 0.01
    assert compare_logits(one, ref).max_rel == pytest.approx(0.005, rel=1e-3)
    json.dumps(cmp.as_dict())


def test_compare_generation() -> None:
    cmp = compare_generation([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]])
    assert cmp.token_match == pytest.approx(5 / 6) and cmp.sequence_match == 0.5
    assert cmp.first_mismatch == [None, 1] and not cmp
    early_stop = compare_generation(np.array([7, 8]), [7, 8, 9])
    assert early_stop.first_mismatch == [2] and early_stop.token_match == pytest.approx(2 / 3)
    assert compare_generation([1, 2], [1, 2])


def test_bootstrap_quantile_is_the_pooled_quantile() -> None:
    values = np.arange(100, dtype=float)
    rows = np.repeat(np.arange(10), 10)
    est = bootstrap_quantile(values, rows, np.full(10, 10), 0.95, n_boot=200)
    assert est.mean == 94.0 and est.lo <= est.mean <= est.hi and est.n == 10
