"""Win back what a removal costs: distil the slim model toward the original's next-token distributions.

After the layers are chosen, the slim model (the same model object with the layers skipped) is
trained to minimise KL(original ‖ slim) at every text position of the healing batches. The teacher's
log-probabilities are the ones the certifier already computed on the calibration split with the
original weights (plus, with ``--heal-data``, one more reference pass over that file): computed once,
never recomputed from weights that are being trained.

Only decoder-layer tensors are trained: by default the kept layers next to each gap (``scope =
"adjacent"``), or every kept decoder layer (``"all"``). Embeddings, LM head, final norm and, in VLMs,
the vision tower and projector are never touched. Training is either on the full weights of those
layers (``method = "full"``) or on a low-rank update of each of their linear weights merged back
into the weight afterwards (``"lora"``; ``torch.nn.utils.parametrize``, so the tensor names and the
checkpoint stay plain). Seeded and deterministic on CPU. :meth:`HealResult.undo` restores the
weights exactly (used when the healed model fails its held-out bound and a smaller set is tried).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from skipit.errors import InvalidOptionError

log = logging.getLogger(__name__)

SCOPES = ("adjacent", "all")
METHODS = ("full", "lora")


@dataclass(frozen=True)
class HealConfig:
    """How to heal.

    Attributes:
        steps: optimizer steps (one healing batch each); the run also stops after ``minutes``.
        minutes: wall-clock budget, or None.
        lr: AdamW learning rate (full weights); LoRA uses ``lr * lora_lr_scale``.
        scope: ``adjacent`` (the ``neighbours`` kept layers on each side of each gap) or ``all``.
        neighbours: kept layers trained on each side of each gap (scope ``adjacent``).
        method: ``full`` (train the layers' weights) or ``lora`` (rank-``lora_rank`` updates, merged).
        lora_rank: rank of each low-rank update.
        lora_lr_scale: LoRA learning-rate multiplier (low-rank factors start at zero / small).
        weight_decay: AdamW weight decay (0: none, the weights start at a good point).
        select_slack: with healing, layers are *chosen* under ``select_slack ×`` the KL bound (the
            unhealed cost), then healed and certified under the bound itself on held-out data.
        seed: seeds the batch order and LoRA initialisation.
    """

    steps: int = 80
    minutes: float | None = None
    lr: float = 1e-4
    scope: str = "adjacent"
    neighbours: int = 1
    method: str = "full"
    lora_rank: int = 16
    lora_lr_scale: float = 10.0
    weight_decay: float = 0.0
    select_slack: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise InvalidOptionError(f"--heal-steps must be ≥ 1, got {self.steps}")
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            raise InvalidOptionError(f"--heal-minutes must be a positive number, got {self.minutes}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidOptionError(f"--heal-lr must be a positive number, got {self.lr}")
        if self.scope not in SCOPES:
            raise InvalidOptionError(f"--heal-scope {self.scope!r} is not one of {', '.join(SCOPES)}")
        if self.method not in METHODS:
            raise InvalidOptionError(f"--heal-method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.neighbours < 1 or self.lora_rank < 1:
            raise InvalidOptionError("neighbours and lora_rank must be ≥ 1")
        if not (math.isfinite(self.select_slack) and self.select_slack >= 1):
            raise InvalidOptionError(f"select_slack must be ≥ 1, got {self.select_slack}")


@dataclass
class HealResult:
    """What healing did: the manifest's record, and the means to undo it."""

    removed: list[int]
    layers: list[int]
    tensors: list[str]
    method: str
    steps: int
    lr: float
    seconds: float
    losses: list[float]
    samples: dict[str, list[int]]
    tokens: int
    stopped_by: str
    _snapshot: dict[str, Any] = field(default_factory=dict, repr=False)

    def undo(self, model: Any) -> None:
        """Put the trained tensors back to their values before healing (exactly)."""
        import torch

        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self._snapshot.items():
                params[name].copy_(value)
        self._snapshot = {}

    def as_dict(self) -> dict[str, Any]:
        return {"removed": self.removed, "trained_layers": self.layers, "tensors": self.tensors,
                "method": self.method, "steps": self.steps, "lr": self.lr, "seconds": round(self.seconds, 2),
                "losses": [round(x, 5) for x in self.losses], "samples": self.samples, "tokens": self.tokens,
                "stopped_by": self.stopped_by}


def layers_to_train(n_layers: int, removed: Sequence[int], config: HealConfig) -> list[int]:
    """Kept layers (original numbering) that healing trains for a removal of ``removed``."""
    kept = [i for i in range(n_layers) if i not in set(removed)]
    if config.scope == "all":
        return kept
    chosen: set[int] = set()
    for r in removed:
        below = [i for i in kept if i < r][-config.neighbours:]
        above = [i for i in kept if i > r][: config.neighbours]
        chosen.update(below + above)
    return sorted(chosen)


@dataclass
class HealData:
    """Encoded healing batches with the original model's log-probabilities at their text positions.

    ``sample_ids[split]`` lists the samples (indices into the calibration data's samples, or into the
    ``--heal-data`` file) that the batches hold, for the record and for the held-out guarantee.
    """

    batches: Sequence[Any]
    teacher: Sequence[Any]
    sources: list[str]

    def ids(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for batch, source in zip(self.batches, self.sources):
            out.setdefault(source, []).extend(batch.sample_ids)
        return {k: sorted(v) for k, v in out.items()}


def build_heal_data(model: Any, spec: Any, calibration: Sequence[Any], reference: Sequence[Any],
                    extra: Sequence[Any] = (), config: Any = None) -> HealData:
    """Healing batches with the original's log-probs: the calibration split's (``reference``, already
    measured by the certifier) plus ``extra`` batches (``--heal-data``), measured here with the model as it
    is now — call before any layer is trained. Nothing is copied: the batches are encoded when read and the
    log-probs read back from their reference files (:class:`~skipit.compressor.reference.Chain` joins them)."""
    from skipit.compressor.analyze import AnalyzeConfig, run_pass
    from skipit.compressor.reference import Chain

    sources = ["calibration"] * len(calibration)
    if not extra:
        return HealData(calibration, reference, sources)
    extra_ref = run_pass(model, spec, extra, config=config or AnalyzeConfig(), keep_reference=True,
                         layer_scores=False).kept_reference
    return HealData(Chain(calibration, extra), Chain(reference, extra_ref), sources + ["heal_data"] * len(extra))


def heal_(model: Any, spec: Any, removed: Sequence[int], data: HealData, config: HealConfig = HealConfig(),
          on_step: Callable[[dict[str, Any]], None] | None = None) -> HealResult:
    """Distil the model with ``removed`` skipped toward ``data.teacher``, in place; see the module docstring.

    The layers stay in the model (``spec.skipping`` removes them for the duration), so the caller
    decides whether to keep the result (:func:`~skipit.compressor.rewrite.remove_layers_` afterwards)
    or to :meth:`HealResult.undo` it.
    """
    import torch

    check_trainable(model)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    order_rng = random.Random(config.seed)
    train_layers = layers_to_train(spec.num_layers, removed, config)
    positions = {orig: pos for pos, orig in enumerate(spec.original_indices)}
    modules = [spec.layers[positions[i]] for i in train_layers]
    names = {id(p): n for n, p in model.named_parameters()}
    trained = [(names[id(p)], p) for m in modules for p in m.parameters()]
    snapshot = {n: p.detach().clone() for n, p in trained}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    lora = _LowRank.attach(modules, config) if config.method == "lora" else []
    params = [p for m in lora for p in m.parameters()] if lora else [p for _, p in trained]
    for p in params:
        p.requires_grad_(True)
    lr = config.lr * (config.lora_lr_scale if lora else 1.0)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    losses: list[float] = []
    stopped_by = "steps"
    deadline = started + 60 * config.minutes if config.minutes else math.inf
    order: list[int] = []
    tokens = 0
    was_training = model.training
    model.eval()  # no dropout: the teacher was measured without it, and runs stay deterministic
    try:
        with spec.skipping(removed), torch.enable_grad():
            for step in range(config.steps):
                if time.perf_counter() > deadline:
                    stopped_by = "minutes"
                    break
                if not order:
                    order = list(range(len(data.batches)))
                    order_rng.shuffle(order)
                b = order.pop()
                batch, (teacher_logp, _) = data.batches[b], data.teacher[b]
                logits = model(**batch.inputs, use_cache=False).logits
                logp = torch.log_softmax(logits.float()[batch.text_mask.to(logits.device)], dim=-1)
                # a normal tensor (inference tensors cannot be saved for backward), read from the reference file
                target = teacher_logp.to(logp.device).float().clone()
                loss = (target.exp() * (target - logp)).sum(-1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                tokens += int(batch.text_mask.sum())
                if on_step:
                    on_step({"step": step + 1, "steps": config.steps, "loss": losses[-1]})
    finally:
        for m in lora:
            m.merge()
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, False))
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    log.info("healed %s (removed %s) for %d steps in %.1f s: KL %.4f → %.4f", train_layers, list(removed),
             len(losses), seconds, losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"))
    return HealResult(sorted(removed), train_layers, [n for n, _ in trained], config.method, len(losses), lr, seconds,
                      losses, data.ids(), tokens, stopped_by, snapshot)


def offloaded_parameters(model: Any) -> list[str]:
    """Parameters accelerate keeps off the model (CPU or disk offload: a meta tensor in the model, loaded by a hook
    at each forward and dropped after it)."""
    return [n for n, p in model.named_parameters() if p.device.type == "meta"]


def check_trainable(model: Any) -> None:
    """Refuse healing a model with offloaded weights: an offloaded weight is reloaded from its CPU or disk copy at
    every forward, so a training step on it would be lost (and the optimizer would hold no real tensor)."""
    offloaded = offloaded_parameters(model)
    if offloaded:
        raise InvalidOptionError(
            f"--heal trains weights in place, but {len(offloaded)} of the model's tensors are offloaded to CPU or disk "
            f"by --device auto / --max-memory (e.g. {offloaded[0]}); accelerate reloads those at every forward, so "
            "training them would be lost. Give --max-memory enough room for the whole model on its devices, or "
            "compress without --heal (certification, removal and export work offloaded)")


class _LowRank:
    """Rank-r updates ``W + B @ A · scale`` on every linear weight of the given modules (parametrize)."""

    def __init__(self, linear: Any, config: HealConfig) -> None:
        import torch
        from torch.nn.utils import parametrize

        out_f, in_f = linear.weight.shape
        r = min(config.lora_rank, out_f, in_f)
        dtype, device = linear.weight.dtype, linear.weight.device
        self.linear = linear
        self.a = torch.nn.Parameter(torch.randn(r, in_f, dtype=dtype, device=device) / math.sqrt(in_f))
        self.b = torch.nn.Parameter(torch.zeros(out_f, r, dtype=dtype, device=device))
        update = self

        class Delta(torch.nn.Module):
            def forward(self, weight: Any) -> Any:
                return weight + update.b @ update.a

        parametrize.register_parametrization(linear, "weight", Delta(), unsafe=True)

    @classmethod
    def attach(cls, modules: Sequence[Any], config: HealConfig) -> list["_LowRank"]:
        import torch

        return [cls(m, config) for mod in modules for m in mod.modules() if isinstance(m, torch.nn.Linear)]

    def parameters(self) -> list[Any]:
        return [self.a, self.b]

    def merge(self) -> None:
        """Fold the update into the weight and remove the parametrization (names unchanged)."""
        import torch
        from torch.nn.utils import parametrize

        if parametrize.is_parametrized(self.linear, "weight"):
            with torch.no_grad():
                parametrize.remove_parametrizations(self.linear, "weight", leave_parametrized=True)
