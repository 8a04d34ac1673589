"""Per-layer redundancy scores from one hooked forward pass, streamed (hidden states are never stored).

For every decoder layer and separately for text and vision tokens:

* ``cos_dist`` — mean cosine distance between the layer's input and output (geometric condition);
* ``tail`` — P[cos distance > eps] over tokens (proximal condition);
* ``rel_update`` — ‖h_out − h_in‖ / ‖h_in‖;
* ``lens_kl`` (text tokens) — KL(p(·|h_out) ‖ p(·|h_in)) read through the final norm and LM head
  (the "logit lens"; informational condition), on a fixed subsample of text positions;
* ``vision_attention`` (text tokens of VLM samples with images) — the attention mass text queries
  put on vision keys, averaged over heads (cross-modal condition; see ``crossmodal``).

The same pass can compare the model's output with reference log-probabilities (the original model's),
giving the end-to-end KL(original ‖ current) and top-1 agreement used for verification.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from skipit.compressor.crossmodal import capture_vision_attention
from skipit.compressor.stats import Estimate, bootstrap_ratio, rank01
from skipit.compressor.textlogp import TextLogprobs, head_logprobs
from skipit.errors import InvalidOptionError

log = logging.getLogger(__name__)

MODALITIES = ("text", "vision")
METRICS = ("cos_dist", "tail", "rel_update")
#: Scores where smaller means "more redundant", combined by average rank.
SCORE_NAMES = ("geometric", "proximal", "informational")


@dataclass(frozen=True)
class AnalyzeConfig:
    """Knobs of the hooked pass.

    Attributes:
        eps: cosine-distance threshold of the proximal (tail) condition.
        lens_tokens: text positions per sample read through the logit lens (the LM head is costly).
        confidence: two-sided confidence of the reported intervals.
        n_boot: bootstrap resamples.
    """

    eps: float = 0.1
    lens_tokens: int = 8
    confidence: float = 0.95
    n_boot: int = 1000

    def __post_init__(self) -> None:
        if not 0 < self.eps < 2:  # cosine distance lies in [0, 2]; NaN fails every comparison
            raise InvalidOptionError(f"--eps is a cosine-distance threshold in (0, 2), got {self.eps}")
        if self.lens_tokens < 1 or self.n_boot < 1 or not 0 < self.confidence < 1:
            raise InvalidOptionError("lens_tokens and n_boot must be ≥ 1 and confidence in (0, 1)")


@dataclass
class LayerStats:
    """Scores of one layer (original numbering). ``metrics[modality][metric]`` is an Estimate."""

    index: int
    metrics: dict[str, dict[str, Estimate]]

    def score(self, name: str) -> float:
        """The scalar behind a named condition (text tokens); NaN where it was not measured."""
        text = self.metrics.get("text", {})
        key = {"geometric": "cos_dist", "proximal": "tail", "informational": "lens_kl"}[name]
        est = text.get(key)
        return est.mean if est is not None else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, **{m: {k: e.as_dict() for k, e in v.items()} for m, v in self.metrics.items()}}


@dataclass
class Divergence:
    """End-to-end change of the output against a reference, with one-sided bounds.

    ``kl.hi`` is the upper confidence bound of mean KL(reference ‖ current) in nats per token;
    ``top1.lo`` the lower bound of top-1 agreement.
    """

    kl: Estimate
    top1: Estimate
    nll: Estimate
    #: per-sample sums [samples, 3] of (KL, top-1 agreement, next-token NLL), for paired statistics
    sample_sums: np.ndarray | None = None
    #: per-sample counts [samples, 2] of (text tokens, text tokens with a next text token)
    sample_counts: np.ndarray | None = None
    #: per-token KL and the sample (row) each token belongs to, for quantiles
    token_kl: np.ndarray | None = None
    token_rows: np.ndarray | None = None
    #: per-token position in its sequence (0-based) and top-1 agreement, for per-context-length figures
    token_pos: np.ndarray | None = None
    token_agree: np.ndarray | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"kl": self.kl.as_dict(), "top1": self.top1.as_dict(), "nll": self.nll.as_dict()}

    def by_group(self, groups: Sequence[str], config: "AnalyzeConfig") -> dict[str, dict[str, Any]]:
        """KL and top-1 agreement (with one-sided bounds) per group of samples; ``groups[i]`` names sample i."""
        if self.sample_sums is None or self.sample_counts is None:
            raise ValueError("this Divergence has no per-sample sums (run_pass records them)")
        labels = np.asarray(list(groups))
        out = {}
        for g in sorted(set(labels.tolist())):
            rows = np.flatnonzero(labels == g)
            out[g] = self._estimates(self.sample_sums[rows, :2], self.sample_counts[rows, 0], config)
        return out

    def by_position(self, edges: Sequence[int], config: "AnalyzeConfig") -> dict[str, dict[str, Any]]:
        """KL and top-1 agreement per bucket of token positions (``edges`` are bucket ends, 1-based tokens)."""
        pos, token_rows, token_kl, token_agree = self.token_pos, self.token_rows, self.token_kl, self.token_agree
        if self.sample_sums is None or pos is None or token_rows is None or token_kl is None or token_agree is None:
            raise ValueError("this Divergence has no per-token arrays (run_pass records them)")
        n = self.sample_sums.shape[0]
        out, lo = {}, 0
        for hi in edges:
            sel = (pos >= lo) & (pos < hi)
            if np.any(sel):
                sums, counts = np.zeros((n, 2)), np.zeros(n)
                rows = token_rows[sel]
                np.add.at(sums, rows, np.stack([token_kl[sel], token_agree[sel]], axis=1))
                np.add.at(counts, rows, 1)
                out[f"{lo + 1}-{hi}"] = self._estimates(sums, counts, config)
            lo = hi
        return out

    @staticmethod
    def _estimates(sums: np.ndarray, counts: np.ndarray, config: "AnalyzeConfig") -> dict[str, Any]:
        kl, top1 = bootstrap_ratio(sums, counts, confidence=config.confidence, n_boot=config.n_boot, one_sided=True)
        return {"kl": kl.as_dict(), "top1": top1.as_dict(), "samples": int((counts > 0).sum()), "tokens": int(counts.sum())}


@dataclass
class PassResult:
    """What one pass over a split produced."""

    layers: list[LayerStats]
    divergence: Divergence | None
    #: the pass's own log-probs (``keep_reference``): a :class:`~skipit.compressor.reference.ReferenceStore`
    reference: Any
    tokens: dict[str, int]
    #: [layer, n]: mean angular distance (arccos(cos)/π, text tokens) between the input of layer ``layer``
    #: and the input of layer ``layer + n`` — the cost proxy of removing that contiguous block (Gromov et al.)
    block_distance: np.ndarray | None = None

    @property
    def measured(self) -> Divergence:
        """``divergence`` of a pass run against a reference; raises for a pass that had none."""
        if self.divergence is None:
            raise ValueError("this pass ran without a reference, so no divergence was measured")
        return self.divergence

    @property
    def kept_reference(self) -> Any:
        """``reference`` of a pass run with ``keep_reference=True``; raises for a pass that kept none."""
        if self.reference is None:
            raise ValueError("this pass kept no reference (run it with keep_reference=True)")
        return self.reference

    def best_block(self, size: int, allowed: Sequence[int]) -> list[int] | None:
        """The contiguous block of ``size`` layers, all in ``allowed``, with the smallest angular distance."""
        if self.block_distance is None or size >= self.block_distance.shape[1]:
            return None
        ok = set(allowed)
        starts = [s for s in range(self.block_distance.shape[0] - size + 1)
                  if all(self.layers[s + j].index in ok for j in range(size)) and np.isfinite(self.block_distance[s, size])]
        if not starts:
            return None
        distance = self.block_distance
        best = min(starts, key=lambda s: distance[s, size])
        return [self.layers[best + j].index for j in range(size)]

    def combined(self, candidates: Sequence[int] | None = None, vision: bool = False) -> dict[int, float]:
        """Average rank of the condition scores over ``candidates`` (lower = more redundant)."""
        layers = [ls for ls in self.layers if candidates is None or ls.index in candidates]
        if not layers:
            return {}
        columns = [np.array([ls.score(n) for ls in layers]) for n in SCORE_NAMES]
        if vision:
            columns.append(np.array([ls.metrics["vision"]["cos_dist"].mean for ls in layers]))
        ranks = [rank01(np.nan_to_num(c, nan=np.inf)) for c in columns if not np.all(np.isnan(c))]
        combined = np.mean(ranks, axis=0)
        return {ls.index: float(c) for ls, c in zip(layers, combined)}


class _Accumulator:
    """Per-sample sums for every layer × modality × metric."""

    def __init__(self, n_samples: int, n_layers: int) -> None:
        shape = (n_samples, n_layers)
        self.sums = {(m, k): np.zeros(shape) for m in MODALITIES for k in METRICS}
        self.counts = {m: np.zeros(n_samples) for m in MODALITIES}
        self.lens_sum = np.zeros(shape)
        self.lens_count = np.zeros(n_samples)
        self.xattn_sum = np.zeros(shape)
        self.xattn_count = np.zeros(n_samples)


def _lens_positions(text_mask: Any, per_sample: int) -> tuple[Any, Any]:
    """Evenly spaced text positions per row (deterministic)."""
    import torch

    rows, cols = [], []
    for r in range(text_mask.shape[0]):
        pos = text_mask[r].nonzero().flatten()
        if len(pos) > per_sample:
            pos = pos[torch.linspace(0, len(pos) - 1, per_sample).round().long()]
        rows.append(torch.full_like(pos, r))
        cols.append(pos)
    return torch.cat(rows), torch.cat(cols)


def _kl(logp: Any, logq: Any) -> Any:
    """KL(p ‖ q) per row, from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


def run_pass(
    model: Any,
    spec: Any,
    batches: Sequence[Any],
    *,
    config: AnalyzeConfig = AnalyzeConfig(),
    reference: Sequence[Any] | None = None,
    keep_reference: bool = False,
    layer_scores: bool = True,
    block_span: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> PassResult:
    """One forward pass over ``batches`` with per-layer hooks.

    Args:
        reference: per-batch reference log-probs at text positions (from a previous pass with
            ``keep_reference=True``); when given, the end-to-end divergence is measured against it.
            Read one batch at a time (any device; moved to the logits' device).
        keep_reference: return this pass's log-probs at text positions (fp16) and top-1 tokens, per
            batch, as a new reference: a :class:`~skipit.compressor.reference.ReferenceStore`, written to
            a file batch by batch (exact; RAM holds one batch), closed when it is garbage-collected.
        layer_scores: compute per-layer statistics (hooks); off for a pure verification pass.
        block_span: also measure the angular distance across every contiguous block of up to this
            many layers (:attr:`PassResult.block_distance`; needs ``layer_scores``).
        on_batch: progress callback, called with the number of samples done in each batch.
    """
    import torch

    from skipit.compressor.batches import count_samples
    from skipit.compressor.reference import ReferenceStore

    n_samples = count_samples(batches)
    n_layers = spec.num_layers
    acc = _Accumulator(n_samples, n_layers)
    state: dict[str, Any] = {}
    handles = []
    kept_reference = ReferenceStore() if keep_reference else None
    div_rows: list[tuple[np.ndarray, ...]] = []
    tokens = {"text": 0, "vision": 0, "lens": 0}

    def on(name: str, device: Any) -> Any:
        """The batch's ``state[name]`` on ``device``: layers of a dispatched model live on several devices."""
        key = (name, str(device))
        cache = state["on"]
        if key not in cache:
            cache[key] = state[name].to(device)
        return cache[key]

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
        state["h_in"] = args[0] if args else kwargs["hidden_states"]

    def make_post_hook(pos: int) -> Callable:
        def post_hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            h_out = output[0] if isinstance(output, tuple) else output
            # accelerate moves a layer's input to its device inside the call: the pre-hook saw the previous layer's
            h_in = state["h_in"].to(h_out.device)
            _layer_stats(pos, h_in.float(), h_out.float())
            if block_span:
                _block_stats(pos, h_in, h_out)
        return post_hook

    block_sum = np.full((n_layers, block_span + 1), np.nan) if block_span else None
    if block_sum is not None:
        for i in range(n_layers):
            block_sum[i, 1: min(block_span, n_layers - i) + 1] = 0.0

    def _block_stats(pos: int, h_in: Any, h_out: Any) -> None:
        """Angular distance from the inputs of the ``block_span`` layers before ``pos + 1`` to ``pos``'s output;
        only those inputs are kept (text tokens, float32)."""
        assert block_sum is not None  # called only when block_span > 0
        trace = state.setdefault("trace", {})
        if pos == 0:
            trace.clear()
            trace[0] = h_in[on("text", h_in.device)].float()
        out = trace[pos + 1] = h_out[on("text", h_out.device)].float()
        for n in range(1, min(block_span, pos + 1) + 1):
            start = trace[pos + 1 - n]
            cos = torch.nn.functional.cosine_similarity(start, out.to(start.device), dim=-1).clamp(-1, 1)
            block_sum[pos + 1 - n, n] += float((torch.arccos(cos) / np.pi).sum())
        trace.pop(pos + 1 - block_span, None)

    def _layer_stats(pos: int, h_in: Any, h_out: Any) -> None:
        dist = 1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)  # [b, s]
        rel = (h_out - h_in).norm(dim=-1) / h_in.norm(dim=-1).clamp_min(1e-12)
        rows = state["rows"]
        for modality in ("text", "vision"):
            m = on(modality, dist.device).float()
            for key, value in (("cos_dist", dist), ("tail", (dist > config.eps).float()), ("rel_update", rel)):
                acc.sums[(modality, key)][rows, pos] += (value * m).sum(-1).cpu().numpy()
        lr, lc = state["lens_idx"]
        if len(lr):
            lr, lc = lr.to(h_out.device), lc.to(h_out.device)
            if pos == 0:
                state["lens_prev"] = head_logprobs(spec, spec.norm(h_in[lr, lc]))
            cur = head_logprobs(spec, spec.norm(h_out[lr, lc]))
            kl = _kl(cur, state["lens_prev"].to(cur.device))
            np.add.at(acc.lens_sum[:, pos], rows[lr.cpu().numpy()], kl.cpu().numpy())
            state["lens_prev"] = cur

    def record_xattn(pos: int, share: Any) -> None:
        text = on("text", share.device).float()
        acc.xattn_sum[state["rows"], pos] += (share * text).sum(-1).cpu().numpy()

    heads = TextLogprobs(model, spec)
    stack = contextlib.ExitStack()
    if layer_scores and spec.is_vlm:
        stack.enter_context(capture_vision_attention(spec, lambda: state.get("vision"), record_xattn))
    if layer_scores:
        for pos, layer in enumerate(spec.layers):
            handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(layer.register_forward_hook(make_post_hook(pos), with_kwargs=True))
    start = 0
    try:
        with stack, heads.hooked(), torch.inference_mode():
            for b_idx, batch in enumerate(batches):
                rows = np.arange(start, start + batch.size)
                start += batch.size
                state.update(rows=rows, text=batch.text_mask, vision=batch.vision_mask, on={})
                state["lens_idx"] = _lens_positions(batch.text_mask, config.lens_tokens) if layer_scores else ([], [])
                for modality, mask in (("text", batch.text_mask), ("vision", batch.vision_mask)):
                    acc.counts[modality][rows] += mask.sum(-1).cpu().numpy()
                if bool(batch.vision_mask.any()):
                    acc.xattn_count[rows] += batch.text_mask.sum(-1).cpu().numpy()
                np.add.at(acc.lens_count, rows[state["lens_idx"][0].cpu().numpy()] if layer_scores else [], 1)
                output = heads.forward(batch)
                state.pop("trace", None)
                with (kept_reference.batch(batch.text_mask.sum(-1)) if kept_reference is not None
                      else contextlib.nullcontext()) as writer:
                    ref = reference[b_idx] if reference is not None else None
                    target, has_next = _next_tokens(batch) if ref is not None else (None, None)
                    parts = []
                    for lo, hi, logp in output.chunks():  # [hi - lo, vocab] at text tokens lo…hi-1
                        if writer is not None:
                            # fp16 halves the bytes of the stored distributions; the top-1 token is kept
                            # exactly, since near-ties (common in small or random models) would flip in fp16
                            writer.write(logp, logp.argmax(-1))
                        if ref is not None:
                            assert target is not None  # set with ref
                            parts.append(_divergence_chunk(logp, ref[0][lo:hi].to(logp.device).float(),
                                                           ref[1][lo:hi].to(logp.device), target[lo:hi]))
                    del output
                if ref is not None:
                    div_rows.append(_divergence_rows(batch, parts, has_next, rows))
                tokens["text"] += int(batch.text_mask.sum())
                tokens["vision"] += int(batch.vision_mask.sum())
                tokens["lens"] += len(state["lens_idx"][0])
                if on_batch:
                    on_batch(batch.size)
    finally:
        for h in handles:
            h.remove()
    layers = _finish_layers(acc, spec, config) if layer_scores else []
    divergence = _finish_divergence(div_rows, n_samples, config) if reference is not None else None
    blocks = block_sum / max(tokens["text"], 1) if block_sum is not None and layer_scores else None
    return PassResult(layers, divergence, kept_reference, tokens, blocks)


def _next_tokens(batch: Any) -> tuple[Any, Any]:
    """At every text token (row-major): the next token id, and whether it is a text token of the same row."""
    import torch

    text = batch.text_mask
    ids = batch.inputs["input_ids"]
    nxt = torch.zeros_like(text)
    nxt[:, :-1] = text[:, 1:]
    return torch.roll(ids, -1, dims=1)[text.to(ids.device)].cpu(), nxt[text].cpu()


def _divergence_chunk(logp: Any, ref: Any, ref_top1: Any, target: Any) -> tuple[Any, ...]:
    """Per token of one slice (CPU): KL(ref ‖ logp), top-1 agreement, NLL of ``target``."""
    kl = _kl(ref, logp).clamp_min(0)
    agree = (ref_top1 == logp.argmax(-1)).float()
    nll = -logp.gather(-1, target.to(logp.device).unsqueeze(-1)).squeeze(-1)
    return tuple(t.float().cpu() for t in (kl, agree, nll))


def _divergence_rows(batch: Any, parts: list, has_next: Any, rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-token KL / top-1 agreement / next-token NLL, as (row ids, kl, agree, nll, nll_mask, positions)."""
    import torch

    text = batch.text_mask.cpu()
    row_of = torch.arange(text.shape[0]).unsqueeze(1).expand_as(text)[text].numpy()
    pos = torch.arange(text.shape[1]).unsqueeze(0).expand_as(text)[text].numpy()
    kl, agree, nll = (torch.cat(c).numpy() if c else np.zeros(0, dtype=np.float32) for c in zip(*parts)) \
        if parts else (np.zeros(0, dtype=np.float32),) * 3
    mask = has_next.float().numpy()
    return rows[row_of], kl, agree, nll * mask, mask, pos


def _finish_divergence(div_rows: list, n_samples: int, config: AnalyzeConfig) -> Divergence:
    sums = np.zeros((n_samples, 3))
    counts = np.zeros(n_samples)
    nll_counts = np.zeros(n_samples)
    for rows, kl, agree, nll, has_next, _ in div_rows:
        np.add.at(sums, rows, np.stack([kl, agree, nll], axis=1))
        np.add.at(counts, rows, 1)
        np.add.at(nll_counts, rows, has_next)
    kw: dict[str, Any] = {"confidence": config.confidence, "n_boot": config.n_boot, "one_sided": True}
    kl, top1 = bootstrap_ratio(sums[:, :2], counts, **kw)
    (nll,) = bootstrap_ratio(sums[:, 2], nll_counts, **kw)
    token_rows = np.concatenate([r[0] for r in div_rows]) if div_rows else np.zeros(0, dtype=int)
    token_kl = np.concatenate([r[1] for r in div_rows]) if div_rows else np.zeros(0)
    token_agree = np.concatenate([r[2] for r in div_rows]) if div_rows else np.zeros(0)
    token_pos = np.concatenate([r[5] for r in div_rows]) if div_rows else np.zeros(0, dtype=int)
    return Divergence(kl, top1, nll, sums, np.stack([counts, nll_counts], axis=1), token_kl, token_rows,
                      token_pos, token_agree)


def _finish_layers(acc: _Accumulator, spec: Any, config: AnalyzeConfig) -> list[LayerStats]:
    kw: dict[str, Any] = {"confidence": config.confidence, "n_boot": config.n_boot}
    per_metric: dict[tuple[str, str], list[Estimate]] = {}
    for modality in MODALITIES:
        if acc.counts[modality].sum() == 0:
            continue
        for key in METRICS:
            per_metric[(modality, key)] = bootstrap_ratio(acc.sums[(modality, key)], acc.counts[modality], **kw)
    if acc.lens_count.sum() > 0:
        per_metric[("text", "lens_kl")] = bootstrap_ratio(acc.lens_sum, acc.lens_count, **kw)
    if acc.xattn_sum.any():
        per_metric[("text", "vision_attention")] = bootstrap_ratio(acc.xattn_sum, acc.xattn_count, **kw)
    layers = []
    for pos, original in enumerate(spec.original_indices):
        metrics: dict[str, dict[str, Estimate]] = {}
        for (modality, key), estimates in per_metric.items():
            metrics.setdefault(modality, {})[key] = estimates[pos]
        layers.append(LayerStats(original, metrics))
    return layers


def analyze(
    model: Any, spec: Any, batches: Sequence[Any], config: AnalyzeConfig = AnalyzeConfig(), **kw: Any
) -> list[LayerStats]:
    """Score every decoder layer on ``batches`` (one pass); see the module docstring."""
    return run_pass(model, spec, batches, config=config, **kw).layers
