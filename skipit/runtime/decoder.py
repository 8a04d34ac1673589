"""A merged decoder graph (:mod:`skipit.exporters.onnx.convention`, or optimum's) fed step by step, whatever runs it.

:class:`MergedDecoder` builds the feed (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.*``) and splits the outputs (``logits``, ``present.*``); a backend supplies ``_run`` —
onnxruntime (:class:`~skipit.runtime.ort_text.OrtDecoderRunner`) or TensorRT through Polygraphy
(:class:`~skipit.runtime.tensorrt.TrtDecoderRunner`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from skipit.errors import InvalidOptionError
from skipit.exporters.onnx.convention import kv_output_names, position_ids_from_mask
from skipit.runtime.base import greedy_decode

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

KV = list[tuple["np.ndarray", "np.ndarray"]]


class MergedDecoder:
    """Feeds a merged decoder graph; a :class:`~skipit.runtime.base.StepDecoder`.

    ``past`` and ``present`` are lists of ``(key, value)`` arrays, one pair per layer, each
    [batch, kv_heads, length, head_dim]. Subclasses set ``input_names``, ``num_layers``, ``kv_heads``,
    ``head_dim`` and ``kv_dtype`` and implement :meth:`_run`.
    """

    input_names: list[str]
    num_layers: int
    kv_heads: int
    head_dim: int
    kv_dtype: str

    def _run(self, output_names: list[str], feed: dict[str, "np.ndarray"]) -> list["np.ndarray"]:
        """The named outputs for ``feed``."""
        raise NotImplementedError

    @functools.cached_property
    def _present_names(self) -> list[str]:
        return kv_output_names(self.num_layers)

    def empty_past(self, batch: int) -> KV:
        """Zero-length past for a prefill (onnxruntime accepts zero-sized tensors)."""
        import numpy as np

        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [(np.zeros(shape, self.kv_dtype), np.zeros(shape, self.kv_dtype)) for _ in range(self.num_layers)]

    def forward(
        self,
        input_ids: "np.ndarray",
        attention_mask: "np.ndarray | None" = None,
        past: "Sequence[tuple[np.ndarray, np.ndarray]] | None" = None,
        position_ids: "np.ndarray | None" = None,
    ) -> tuple["np.ndarray", KV]:
        """One step: logits [batch, seq, vocab] and the present cache (past + these tokens).

        ``attention_mask`` covers past + new tokens (default: all ones); ``position_ids`` default to
        the running count of the mask (left padding handled as in transformers).
        """
        import numpy as np

        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2:
            raise InvalidOptionError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        batch, seq = input_ids.shape
        past = self.empty_past(batch) if past is None else list(past)
        if len(past) != self.num_layers:
            raise InvalidOptionError(f"past has {len(past)} layers, the graph {self.num_layers}")
        past_len = past[0][0].shape[2] if past else 0
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + seq), np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        if attention_mask.shape != (batch, past_len + seq):
            raise InvalidOptionError(
                f"attention_mask must be [batch, past + seq] = {(batch, past_len + seq)}, got {attention_mask.shape}"
            )
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, seq)
        feed: dict[str, np.ndarray] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "position_ids" in self.input_names:
            feed["position_ids"] = np.asarray(position_ids, dtype=np.int64)
        for i, (k, v) in enumerate(past):
            feed[f"past_key_values.{i}.key"] = np.asarray(k, dtype=self.kv_dtype)
            feed[f"past_key_values.{i}.value"] = np.asarray(v, dtype=self.kv_dtype)
        outputs = self._run(["logits", *self._present_names], feed)
        flat = outputs[1:]
        return outputs[0], [(flat[2 * i], flat[2 * i + 1]) for i in range(self.num_layers)]

    def prompt_past(self, batch: int) -> KV:
        """The past a prompt starts from: empty (onnxruntime accepts zero-length tensors)."""
        return self.empty_past(batch)

    # -- StepDecoder ---------------------------------------------------------------------------------
    def start(self, input_ids: Any, attention_mask: Any = None, inputs: Mapping[str, Any] | None = None
              ) -> tuple["np.ndarray", tuple[KV, "np.ndarray"]]:
        """The prompt after :meth:`prompt_past`, whose slots (if any) the mask keeps out, now and at every step."""
        import numpy as np

        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        past = self.prompt_past(ids.shape[0])
        slots = past[0][0].shape[2] if past else 0
        mask = np.concatenate([np.zeros((ids.shape[0], slots), np.int64), mask], axis=1)
        logits, present = self.forward(ids, mask, past)
        return logits, (present, mask)

    def advance(self, next_ids: Any, state: tuple[KV, "np.ndarray"]) -> tuple["np.ndarray", tuple[KV, "np.ndarray"]]:
        import numpy as np

        past, mask = state
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        logits, present = self.forward(next_ids, mask, past)
        return logits, (present, mask)

    def generate_greedy(
        self,
        input_ids: "np.ndarray",
        max_new_tokens: int,
        attention_mask: "np.ndarray | None" = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
    ) -> "np.ndarray":
        """Greedy decoding with the KV cache (:func:`~skipit.runtime.base.greedy_decode`): prompt + new tokens."""
        return greedy_decode(self, input_ids, max_new_tokens, attention_mask=attention_mask,
                             eos_token_id=eos_token_id, pad_token_id=pad_token_id)
