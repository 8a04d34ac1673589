"""Theory alignment: do the cheap scores predict the real damage of removing a layer?

Removes each candidate layer alone, measures the held-out KL(original ‖ slim) and top-1 agreement,
and reports the Spearman rank correlation between each score (measured on the calibration split)
and that damage. This is the paper's central claim made reproducible on the user's own model; it
costs one pass per layer, so it is opt-in (``skipit analyze --oracle``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from skipit.compressor.analyze import SCORE_NAMES, AnalyzeConfig, PassResult, run_pass
from skipit.compressor.stats import spearman


@dataclass
class OracleResult:
    """Per-layer damage when removed alone, and how well each score ranks it."""

    damage: dict[int, dict[str, float]]
    spearman: dict[str, float]
    passes: int

    def as_dict(self) -> dict[str, Any]:
        return {"damage": self.damage, "spearman": self.spearman, "passes": self.passes}


def score_columns(scores: PassResult, layers: Sequence[int], vision: bool) -> dict[str, np.ndarray]:
    """Each named score (plus ``combined``) as an array over ``layers``."""
    by_index = {ls.index: ls for ls in scores.layers}
    columns = {name: np.array([by_index[i].score(name) for i in layers]) for name in SCORE_NAMES}
    combined = scores.combined(layers, vision=vision)
    columns["combined"] = np.array([combined[i] for i in layers])
    if vision:
        columns["vision_geometric"] = np.array([by_index[i].metrics["vision"]["cos_dist"].mean for i in layers])
    return columns


def oracle(
    model: Any,
    spec: Any,
    calibration: Sequence[Any],
    holdout: Sequence[Any],
    *,
    layers: Sequence[int] | None = None,
    config: AnalyzeConfig = AnalyzeConfig(),
    scores: PassResult | None = None,
    on_pass: Callable[[int], None] | None = None,
) -> OracleResult:
    """Remove each of ``layers`` (default: all) alone and correlate the damage with the scores."""
    layers = list(range(spec.num_layers)) if layers is None else list(layers)
    if scores is None:
        scores = run_pass(model, spec, calibration, config=config)
    reference = run_pass(model, spec, holdout, config=config, keep_reference=True, layer_scores=False).kept_reference
    damage = {}
    for layer in layers:
        with spec.skipping([layer]):
            div = run_pass(model, spec, holdout, config=config, reference=reference, layer_scores=False).measured
        damage[layer] = {"kl": div.kl.mean, "kl_hi": div.kl.hi, "top1": div.top1.mean}
        if on_pass:
            on_pass(layer)
    kl = np.array([damage[i]["kl"] for i in layers])
    vision = spec.is_vlm and scores.tokens["vision"] > 0
    correlations = {name: spearman(col, kl) for name, col in score_columns(scores, layers, vision).items()}
    return OracleResult(damage, correlations, passes=len(layers) + 2)
