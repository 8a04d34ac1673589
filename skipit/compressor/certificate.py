"""What a certificate must guarantee (:class:`CertifyPolicy`, the one home of its defaults) and what it
states (:class:`Certificate`, with every verified :class:`Step`): typed, versioned, with a dict round trip."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from skipit.errors import InvalidOptionError

if TYPE_CHECKING:
    from skipit.compressor.analyze import Divergence


BOUNDS = ("worst-domain", "pooled")
#: A domain needs this many held-out samples for a bound of its own; smaller ones are pooled as "other".
MIN_DOMAIN_SAMPLES = 3
#: Ends of the token-position buckets (1-based) of the per-context-length figures.
POSITION_EDGES = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class CertifyPolicy:
    """What a certificate must guarantee, and how hard to search.

    Attributes:
        max_kl: bound on mean KL(original ‖ slim) in nats per text token, held with ``confidence``
            (one-sided bootstrap upper bound over held-out samples). None: no KL bound (then
            ``max_layers`` must be set and the certificate states the bound it measured).
        max_layers: remove at most this many layers.
        min_top1: optional lower bound on top-1 agreement with the original model.
        protect: layers never removed (negative indices count from the end).
        confidence: one-sided confidence of the bounds.
        max_rejections: candidate layers that may fail the bound before the search stops.
        probe_width: best-ranked candidates tried per step (1 = cheapest; more = closer to greedy search).
            With more than ``verify_top`` candidates, each is first *screened*: removed on the first
            ``screen_fraction`` of the calibration batches only; the ``verify_top`` least damaging are
            then verified on the whole calibration split.
        verify_top: candidates per step verified on the whole calibration split after screening.
        screen_fraction: share of the calibration batches a screening pass uses (at least one batch).
        screen_tie_se: the candidate that screens next after the ``verify_top`` is verified as well when
            its screen is within this many standard errors (paired over the screened samples) of the last
            one in: a screen of a few samples cannot tell such sets apart. 0 turns this off.
        max_vision_attention: cross-modal condition (VLMs): a layer whose text queries put more than
            this share of their attention on vision tokens is not a candidate (it carries the
            image into the text stream). None disables the condition.
        bound: what the held-out check certifies: ``worst-domain`` (default) — the largest per-domain
            upper bound of KL (and smallest lower bound of top-1), over the domains with at least
            :data:`MIN_DOMAIN_SAMPLES` held-out samples (the rest pooled as one); ``pooled`` — the bound
            of the mean over all held-out tokens. Data without domains is one domain either way.
        block_candidates: also propose, at each size, the contiguous block with the smallest angular
            distance across it (Gromov et al.; measured in the first pass) as a candidate set.
        swap_width: after each accepted step, screen replacing the chosen layer that cost most by
            each of this many best-ranked other layers; a swap is kept when a full pass confirms it.
    """

    max_kl: float | None = 0.05
    max_layers: int | None = None
    min_top1: float | None = None
    protect: tuple[int, ...] = (0, -1)
    confidence: float = 0.95
    max_rejections: int = 2
    probe_width: int = 6
    verify_top: int = 2
    screen_fraction: float = 0.25
    screen_tie_se: float = 1.0
    max_vision_attention: float | None = 0.5
    bound: str = "worst-domain"
    block_candidates: bool = True
    swap_width: int = 2

    def __post_init__(self) -> None:
        if self.max_kl is None and self.max_layers is None:
            raise InvalidOptionError("give a KL bound (--max-kl) or a layer budget (--max-layers), or both")
        if self.max_kl is not None and not (math.isfinite(self.max_kl) and self.max_kl > 0):
            raise InvalidOptionError(f"--max-kl must be a finite number of nats > 0, got {self.max_kl}; to remove a "
                                     "number of layers without a KL bound, give --max-layers alone")
        if self.min_top1 is not None and not 0 <= self.min_top1 <= 1:
            raise InvalidOptionError(f"--min-top1 is an agreement rate in [0, 1], got {self.min_top1}")
        if self.max_layers is not None and self.max_layers < 1:
            raise InvalidOptionError(f"--max-layers must be ≥ 1, got {self.max_layers}")
        if not 0.5 <= self.confidence < 1:
            raise InvalidOptionError(f"confidence must be in [0.5, 1), got {self.confidence}")
        if self.probe_width < 1 or self.verify_top < 1:
            raise InvalidOptionError("probe_width and verify_top must be ≥ 1")
        if self.bound not in BOUNDS:
            raise InvalidOptionError(f"--bound {self.bound!r} is not one of {', '.join(BOUNDS)}")
        share = self.max_vision_attention
        if share is not None and not 0 < share <= 1:
            raise InvalidOptionError(f"--max-vision-attention must be in (0, 1] or none, got {share}")
        if self.screen_tie_se < 0:
            raise InvalidOptionError(f"screen_tie_se must be ≥ 0, got {self.screen_tie_se}")
        if not 0 < self.screen_fraction <= 1:
            raise InvalidOptionError(f"screen_fraction must be in (0, 1], got {self.screen_fraction}")

    def protected(self, n_layers: int) -> set[int]:
        """Protected layer indices, resolved for a model with ``n_layers`` layers."""
        out = set()
        for i in self.protect:
            j = i + n_layers if i < 0 else i
            if not 0 <= j < n_layers:
                raise InvalidOptionError(f"--protect {i} is out of range for {n_layers} layers")
            out.add(j)
        return out

    def check_budget(self, n_layers: int) -> None:
        """Refuse a layer budget the model cannot satisfy."""
        if self.max_layers is not None and self.max_layers >= n_layers:
            raise InvalidOptionError(
                f"--max-layers {self.max_layers} must be smaller than the model's {n_layers} decoder layers"
            )

    def cross_modal_ok(self, stats: Any) -> bool:
        """Whether a layer's measured text→vision attention share satisfies the cross-modal condition."""
        share = stats.metrics.get("text", {}).get("vision_attention")
        return self.max_vision_attention is None or share is None or share.mean <= self.max_vision_attention

    def loosened(self, factor: float) -> "CertifyPolicy":
        """The same policy with the KL bound multiplied by ``factor`` (selection before healing)."""
        return self if self.max_kl is None or factor == 1 else replace(self, max_kl=self.max_kl * factor)

    def admits(self, div: Divergence) -> bool:
        """Whether a measured divergence satisfies the bounds (upper KL bound, lower top-1 bound)."""
        return self.admits_bound(div.kl.hi, div.top1.lo)

    def admits_bound(self, kl_hi: float, top1_lo: float) -> bool:
        """Whether an upper KL bound and a lower top-1 bound satisfy the policy."""
        return (self.max_kl is None or kl_hi <= self.max_kl) and (self.min_top1 is None or top1_lo >= self.min_top1)


@dataclass
class Step:
    """One verified try during selection (calibration split)."""

    layers: list[int]
    candidate: int
    accepted: bool
    kl: float
    kl_hi: float
    top1: float
    rank_score: float
    #: how the set was proposed: ``greedy`` (best-ranked layer added), ``block`` (contiguous block with
    #: the smallest angular distance, Gromov et al.) or ``swap`` (a chosen layer replaced by another)
    kind: str = "greedy"


@dataclass
class Certificate:
    """The outcome: which layers go, and the evidence that the bound holds on held-out data."""

    layers: list[int]
    order: list[int]
    n_layers: int
    policy: dict[str, Any]
    holdout: dict[str, Any]
    calibration: dict[str, Any]
    passes: dict[str, int]
    steps: list[Step] = field(default_factory=list)
    initial_scores: list[dict[str, Any]] = field(default_factory=list)
    combined_scores: dict[int, float] = field(default_factory=dict)
    conditions: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    #: with healing: what was trained, and the KL of the certified set before and after healing
    healing: dict[str, Any] | None = None

    @property
    def kl_bound(self) -> float:
        """The certified upper bound on mean KL (nats/token) on the held-out split (worst domain by default)."""
        return float(self.holdout.get("bound", {}).get("kl_hi", self.holdout["kl"]["hi"]))

    FORMAT = "skipit-certificate/1"

    def as_dict(self) -> dict[str, Any]:
        """JSON-able record with its format version; :meth:`from_dict` reads it back."""
        out = {"format": self.FORMAT, **asdict(self)}
        out["statement"] = self.statement() if self.holdout else ""
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Certificate":
        """The certificate :meth:`as_dict` wrote (JSON keys of ``combined_scores`` turned back into ints)."""
        fmt = data.get("format", cls.FORMAT)
        if fmt != cls.FORMAT:
            raise InvalidOptionError(f"certificate format {fmt!r} is not {cls.FORMAT!r}; rerun skipit-compress "
                                     "with this skipit version")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        kw["steps"] = [Step(**s) for s in data.get("steps", [])]
        kw["combined_scores"] = {int(k): v for k, v in data.get("combined_scores", {}).items()}
        return cls(**kw)

    def statement(self) -> str:
        """One sentence a user can read."""
        h = self.holdout
        bound = h.get("bound", {"kind": "pooled"})
        worst = (f"; in its worst domain ({bound['domain']}) ≤ {bound['kl_hi']:.4f}, the certified bound"
                 if bound["kind"] == "worst-domain" else "")
        longest = f", contexts up to {h['longest_context']} tokens" if h.get("longest_context") else ""
        return (
            f"Removing layers {self.layers} of {self.n_layers}: mean KL(original‖slim) = {h['kl']['mean']:.4f} nats/token, "
            f"≤ {h['kl']['hi']:.4f} with {self.policy['confidence']:.0%} confidence (one-sided bootstrap over "
            f"{h['kl']['n']} held-out samples, {h['tokens']} tokens){worst}; top-1 agreement {h['top1']['mean']:.3f} "
            f"(≥ {h['top1']['lo']:.3f})" + (", measured after healing" if self.healing else "")
            + f". Holds for data like the held-out split it was measured on{longest}."
        )
