"""Does the slim model still behave like the original? Measured on a data split, with paired intervals.

:func:`check_parity` runs

* **logit parity** (:func:`logit_parity`) — three forward passes through
  :func:`~skipit.compressor.analyze.run_pass`: the original keeps its log-probs as the reference, the
  original is compared with that reference (the *floor*: the fp16 rounding of the stored reference,
  what identical models score) and the slim model is compared with it. Reported: mean and
  95th-percentile per-token KL(original ‖ slim), top-1 agreement, perplexity of each model and the
  ratio slim / original;
* **generation parity** (:func:`generation_parity`) — N greedy tokens from a prompt cut out of each
  sample (:mod:`skipit.validators.generation`) with both models: the share of identical tokens and of
  identical sequences, and, for samples with an ``answer``, task accuracy of each model.

Every number has a bootstrap interval over *samples*, and the two models are resampled together
(same sample ids in every draw), so an interval on a difference or ratio is a paired one.

Backend parity (ONNX Runtime vs torch) lives in :mod:`skipit.validators.compare` and is re-exported here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from skipit.compressor.calibration import DataOptions
from skipit.compressor.stats import Estimate, bootstrap_quantile, bootstrap_ratio
from skipit.errors import InvalidOptionError, MissingAnswersError
from skipit.validators.compare import (  # noqa: F401 - re-exported
    GenerationComparison,
    LogitComparison,
    compare_generation,
    compare_logits,
    sequence_agreement,
)

log = logging.getLogger(__name__)

Event = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class ParityConfig:
    """How parity is measured.

    Attributes:
        confidence: two-sided confidence of every interval.
        n_boot: bootstrap draws (the same draws for every statistic: paired).
        seed: seed of the draws.
        kl_quantile: the per-token KL quantile reported besides the mean.
        new_tokens: greedy tokens generated per sample; 0 skips generation parity.
        generate_samples: generate for at most this many samples (the first ones); None: all.
        prompt_fraction / max_prompt_tokens: where a sample without an answer is cut into a prompt.
        accuracy: True requires task accuracy (``MissingAnswersError`` if no sample has an answer),
            False skips it, None measures it when some samples have answers.
        batch_size / max_length: encoding of the samples (as in the certificate).
    """

    confidence: float = 0.95
    n_boot: int = 1000
    seed: int = 0
    kl_quantile: float = 0.95
    new_tokens: int = 16
    generate_samples: int | None = 64
    prompt_fraction: float = 0.5
    max_prompt_tokens: int = 64
    accuracy: bool | None = None
    batch_size: int = DataOptions.batch_size
    max_length: int = DataOptions.max_length

    def __post_init__(self) -> None:
        if not 0.5 <= self.confidence < 1:
            raise InvalidOptionError(f"confidence must be in [0.5, 1), got {self.confidence}")
        if not 0 < self.kl_quantile < 1:
            raise InvalidOptionError(f"kl_quantile must be in (0, 1), got {self.kl_quantile}")
        if self.new_tokens < 0 or (self.generate_samples is not None and self.generate_samples < 0):
            raise InvalidOptionError("new_tokens and generate_samples must be ≥ 0")
        if not 0 < self.prompt_fraction <= 1:
            raise InvalidOptionError(f"prompt_fraction must be in (0, 1], got {self.prompt_fraction}")

    @property
    def _boot(self) -> dict[str, Any]:
        return {"confidence": self.confidence, "n_boot": self.n_boot, "seed": self.seed}


def _exp(e: Estimate) -> Estimate:
    return Estimate(math.exp(e.mean), math.exp(e.lo), math.exp(e.hi), e.n)


@dataclass
class LogitParity:
    """Teacher-forced comparison on every text token of the split (see the module docstring)."""

    kl: Estimate
    kl_quantile: Estimate
    quantile: float
    kl_floor: Estimate
    top1: Estimate
    ppl_original: Estimate
    ppl_slim: Estimate
    ppl_ratio: Estimate
    tokens: int
    samples: int

    def as_dict(self) -> dict[str, Any]:
        est = {k: getattr(self, k).as_dict() for k in ("kl", "kl_quantile", "kl_floor", "top1", "ppl_original",
                                                       "ppl_slim", "ppl_ratio")}
        return est | {"quantile": self.quantile, "tokens": self.tokens, "samples": self.samples}


@dataclass
class GenerationParity:
    """Greedy continuations of both models from the same prompts.

    ``accuracy_*`` are None when no sample has an answer; ``accuracy_delta`` is slim − original
    (paired). ``tokens_original`` / ``tokens_slim`` hold the generated ids per prompt.
    """

    token_match: Estimate
    sequence_match: Estimate
    new_tokens: int
    prompts: int
    accuracy_original: Estimate | None = None
    accuracy_slim: Estimate | None = None
    accuracy_delta: Estimate | None = None
    answered: int = 0
    tokens_original: list[list[int]] | None = None
    tokens_slim: list[list[int]] | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"token_match": self.token_match.as_dict(), "sequence_match": self.sequence_match.as_dict(),
                               "new_tokens": self.new_tokens, "prompts": self.prompts, "answered": self.answered}
        for key in ("accuracy_original", "accuracy_slim", "accuracy_delta"):
            value = getattr(self, key)
            out[key] = value.as_dict() if value is not None else None
        return out


@dataclass
class ParityReport:
    """Logit parity, plus generation parity when it was measured."""

    logits: LogitParity
    generation: GenerationParity | None

    def as_dict(self) -> dict[str, Any]:
        return {"logits": self.logits.as_dict(), "generation": self.generation.as_dict() if self.generation else None}


def _model_device(model: Any) -> str:
    from skipit.compressor.placement import input_device  # a dispatched model's first parameter may be on "meta"

    return str(input_device(model))


def logit_parity(original: Any, slim: Any, batches: Sequence[Any], config: ParityConfig = ParityConfig(),
                 on_event: Event | None = None, label: str = "data", removed: Sequence[int] = ()) -> LogitParity:
    """KL, top-1 agreement and perplexities of ``slim`` against ``original`` on encoded ``batches``.

    ``label`` and ``removed`` (the slim model's removed layers, when known) only name the progress events.
    """
    from skipit.compressor.analyze import AnalyzeConfig, run_pass
    from skipit.compressor.arch import decoder_spec

    from skipit.compressor.batches import count_samples

    emit = on_event or (lambda kind, info: None)
    acfg = AnalyzeConfig(confidence=config.confidence, n_boot=config.n_boot)
    n = count_samples(batches)

    def one_pass(model: Any, what: str, gone: list[Any], **kw: Any) -> Any:
        emit("pass_start", {"split": f"{label} {what}", "removed": gone, "samples": n})
        return run_pass(model, decoder_spec(model), batches, config=acfg, layer_scores=False,
                        on_batch=lambda k: emit("batch", {"n": k}), **kw)

    reference = one_pass(original, "reference", [], keep_reference=True).reference
    floor = one_pass(original, "floor", [], reference=reference).divergence
    div = one_pass(slim, "slim", list(removed) or ["(slim)"], reference=reference).divergence
    text_counts, nll_counts = div.sample_counts[:, 0], div.sample_counts[:, 1]
    kl, top1 = bootstrap_ratio(div.sample_sums[:, :2], text_counts, **config._boot)
    nll_o, nll_s = floor.sample_sums[:, 2], div.sample_sums[:, 2]
    ce_o, ce_s, ce_delta = bootstrap_ratio(np.stack([nll_o, nll_s, nll_s - nll_o], axis=1), nll_counts, **config._boot)
    (kl_floor,) = bootstrap_ratio(floor.sample_sums[:, 0], text_counts, **config._boot)
    quantile = bootstrap_quantile(div.token_kl, div.token_rows, text_counts, config.kl_quantile, **config._boot)
    return LogitParity(kl=kl, kl_quantile=quantile, quantile=config.kl_quantile, kl_floor=kl_floor, top1=top1,
                       ppl_original=_exp(ce_o), ppl_slim=_exp(ce_s), ppl_ratio=_exp(ce_delta),
                       tokens=int(text_counts.sum()), samples=n)


def _generation_samples(samples: Sequence[Any], config: ParityConfig) -> list[Any]:
    """The samples generation runs on; refuses ``accuracy=True`` when none of them has an answer."""
    chosen = list(samples)[: config.generate_samples]
    if config.accuracy and not any(s.answer is not None for s in chosen):
        raise MissingAnswersError(
            f"task accuracy was requested but none of the {len(chosen)} evaluation samples has an \"answer\"; "
            'give data whose JSONL lines carry one, e.g. {"text": "Q: 2+2?", "answer": "4"}, or leave accuracy off')
    return chosen


def generation_parity(original: Any, slim: Any, samples: Sequence[Any], processor: Any,
                      config: ParityConfig = ParityConfig(), on_event: Event | None = None) -> GenerationParity:
    """Greedy continuations of both models from the same prompts; accuracy where samples have answers."""
    from skipit.compressor.arch import decoder_spec
    from skipit.runtime.torch_runner import hf_greedy
    from skipit.validators.generation import answer_matches, build_prompts

    emit = on_event or (lambda kind, info: None)
    chosen = _generation_samples(samples, config)
    answered = [s for s in chosen if s.answer is not None]
    tokenizer = getattr(processor, "tokenizer", processor)
    prompts = build_prompts(chosen, processor, decoder_spec(original), prompt_fraction=config.prompt_fraction,
                            max_prompt_tokens=config.max_prompt_tokens, max_length=config.max_length,
                            device=_model_device(original))
    emit("pass_start", {"split": f"greedy generation ({config.new_tokens} tokens)", "removed": [], "samples": len(prompts)})
    gen_o, gen_s, rows = [], [], []
    for p in prompts:
        a, b = (hf_greedy(m, p.inputs, config.new_tokens, tokenizer.pad_token_id) for m in (original, slim))
        equal, length, first = sequence_agreement(a, b)
        rows.append((equal / length if length else 1.0, float(first is None)))
        gen_o.append(a)
        gen_s.append(b)
        emit("batch", {"n": 1})
    ones = np.ones(len(rows))
    token_match, sequence_match = bootstrap_ratio(np.array(rows).reshape(-1, 2), ones, **config._boot)
    result = GenerationParity(token_match, sequence_match, config.new_tokens, len(prompts),
                              tokens_original=gen_o, tokens_slim=gen_s)
    if answered and config.accuracy is not False:
        answers = [(i, p.answer) for i, p in enumerate(prompts) if p.answer is not None]
        right = np.array([[answer_matches(tokenizer.decode(g[i], skip_special_tokens=True), answer)
                           for g in (gen_o, gen_s)] for i, answer in answers], dtype=np.float64)
        acc = bootstrap_ratio(np.column_stack([right, right[:, 1] - right[:, 0]]), np.ones(len(answers)), **config._boot)
        result.accuracy_original, result.accuracy_slim, result.accuracy_delta = acc
        result.answered = len(answers)
    return result


def check_parity(original: Any, slim: Any, samples: Sequence[Any], processor: Any,
                 config: ParityConfig = ParityConfig(), on_event: Event | None = None, label: str = "data",
                 removed: Sequence[int] = ()) -> ParityReport:
    """Logit parity on all ``samples`` and generation parity on the first ``config.generate_samples``.

    Both models must share ``processor`` (a slim model keeps the original's tokenizer) and device.
    """
    from skipit.compressor.arch import decoder_spec
    from skipit.compressor.batches import encode

    if not samples:
        raise InvalidOptionError("no samples to validate on; give a data file with more lines or another split")
    if config.accuracy and (config.new_tokens == 0 or config.generate_samples == 0):
        raise InvalidOptionError("task accuracy needs generation: set new_tokens > 0 and generate_samples > 0")
    if config.new_tokens > 0:
        _generation_samples(samples, config)  # fail before the forward passes, not after
    batches = encode(samples, processor, decoder_spec(original), batch_size=config.batch_size,
                     max_length=config.max_length, device=_model_device(original))
    logits = logit_parity(original, slim, batches, config, on_event, label, removed)
    log.info("parity on %d samples: KL %.4g, top-1 %.3f", logits.samples, logits.kl.mean, logits.top1.mean)
    generation = None
    if config.new_tokens > 0 and config.generate_samples != 0:
        generation = generation_parity(original, slim, samples, processor, config, on_event)
    return ParityReport(logits, generation)
