"""The model's next-token log-probabilities at the text positions of a batch, a slice of tokens at a time.

Every pass compares full-vocabulary distributions at every text token. Taking the log-softmax of a whole
batch's logits at once holds several logits-sized tensors together (the logits, their masked copy, the
log-softmax, its fp16 copy for the reference file): for 8 × 128 tokens and a 49k vocabulary that is 192 MiB
each, more than the rest of SmolLM2's forward needs. So the forward is asked for the last position's logits
only (``logits_to_keep=1``), the final norm's output is taken by a hook, and the LM head is applied to slices
of the text positions of at most :data:`CHUNK_BYTES` of float32 logits each (the same ``lm_head`` and soft-cap
as the logit lens). Memory then holds one batch's hidden states and one slice's logits.

The last position's logits are computed both ways at every batch and compared: a model whose head is not
``lm_head(norm(h))`` (+ the spec's soft-cap) — one that scales its logits, say — is noticed, warned about, and
run the plain way (whole-batch logits from the model, still read a slice at a time) from then on.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Iterator

log = logging.getLogger(__name__)

#: Largest float32 logits slice computed at once (bytes).
CHUNK_BYTES = 32 << 20


def head_logits(spec: Any, h: Any) -> Any:
    """float32 logits of normed hidden states ``h`` through the LM head and the architecture's soft-cap."""
    import torch

    logits = spec.lm_head(h).float()
    cap = spec.logit_softcap
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def head_logprobs(spec: Any, h: Any) -> Any:
    """float32 log-probabilities of normed hidden states ``h`` (see :func:`head_logits`)."""
    import torch

    return torch.log_softmax(head_logits(spec, h), dim=-1)


@dataclass
class BatchLogprobs:
    """One batch's forward output, read as log-probabilities over its text positions (row-major order,
    as ``logits[text_mask]``) by :meth:`chunks`. Holds either the final norm's output or the logits."""

    spec: Any
    text_mask: Any
    hidden: Any = None
    logits: Any = None

    def chunks(self) -> Iterator[tuple[int, int, Any]]:
        """``(start, stop, logp)``: float32 log-probs [stop − start, vocab] of text tokens start…stop − 1."""
        import torch

        source = self.hidden if self.hidden is not None else self.logits
        rows, cols = self.text_mask.to(source.device).nonzero(as_tuple=True)
        vocab = self.logits.shape[-1] if self.hidden is None else _vocab(self.spec)
        step = max(1, CHUNK_BYTES // (4 * vocab))
        for start in range(0, len(rows), step):
            stop = min(start + step, len(rows))
            part = source[rows[start:stop], cols[start:stop]]
            if self.hidden is not None:
                yield start, stop, head_logprobs(self.spec, part)
            else:
                yield start, stop, torch.log_softmax(part.float(), dim=-1)


def _vocab(spec: Any) -> int:
    head = spec.lm_head
    return int(getattr(head, "out_features", 0) or head.weight.shape[0])


class TextLogprobs:
    """Runs the forward of batches for :class:`BatchLogprobs` (see the module docstring); use within :meth:`hooked`."""

    def __init__(self, model: Any, spec: Any) -> None:
        self.model, self.spec = model, spec
        self.sliced = "logits_to_keep" in inspect.signature(type(model).forward).parameters
        self._hidden: Any = None

    @contextlib.contextmanager
    def hooked(self) -> Iterator["TextLogprobs"]:
        """Keep the final norm's last output while the block runs (the logit lens calls the norm too, earlier)."""
        if not self.sliced:
            yield self
            return
        handle = self.spec.norm.register_forward_hook(self._capture)
        try:
            yield self
        finally:
            handle.remove()
            self._hidden = None

    def _capture(self, module: Any, args: tuple, output: Any) -> None:
        self._hidden = output[0] if isinstance(output, tuple) else output

    def forward(self, batch: Any) -> BatchLogprobs:
        """The batch's forward (``use_cache=False``)."""
        if self.sliced:
            logits = self.model(**batch.inputs, use_cache=False, logits_to_keep=1).logits
            hidden, self._hidden = self._hidden, None
            if self._agrees(hidden, logits, batch.text_mask):
                return BatchLogprobs(self.spec, batch.text_mask, hidden=hidden)
            log.warning("%s's output logits are not its LM head applied to its final norm's output (with the "
                        "soft-cap the architecture spec names); computing whole-batch logits instead, which "
                        "takes more memory", type(self.model).__name__)
            self.sliced = False
        logits = self.model(**batch.inputs, use_cache=False).logits
        return BatchLogprobs(self.spec, batch.text_mask, logits=logits)

    def _agrees(self, hidden: Any, logits: Any, text_mask: Any) -> bool:
        """Whether the head recomputed from ``hidden`` gives the model's own last-position logits."""
        import torch

        if hidden is None or tuple(hidden.shape[:2]) != tuple(text_mask.shape) or logits.shape[1] != 1:
            return False
        theirs = logits[:, -1].float()
        ours = head_logits(self.spec, hidden[:, -1]).to(theirs.device)
        if ours.shape != theirs.shape:
            return False
        # rounding of the head's own dtype (bf16: 2^-8) bounds the difference of two evaluations of one product
        tol = max(1e-4, 4 * torch.finfo(logits.dtype).eps)
        return bool(torch.allclose(ours, theirs, rtol=tol, atol=tol * float(theirs.abs().max().clamp_min(1))))


__all__ = ["CHUNK_BYTES", "BatchLogprobs", "TextLogprobs", "head_logits", "head_logprobs"]
