"""The torch backend: a transformers model as a :class:`~skipit.runtime.base.Runner` and
:class:`~skipit.runtime.base.StepDecoder`, and transformers' own greedy generation (the reference the
exported backends are compared with)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from skipit.compat import cache_kwarg
from skipit.runtime.base import RssMemory, greedy_decode


class TorchRunner(RssMemory):
    """A transformers causal LM (text decoding). CUDA timings use ``torch.cuda.Event``; prompts run without an
    attention mask (every token attends), as ``measure_speed`` feeds them."""

    def __init__(self, model: Any, name: str = "torch") -> None:
        self.model = model
        self.name = name
        from skipit.compressor.placement import input_device  # a dispatched model's first parameter may be on "meta"

        self.device = str(input_device(model))
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        self._cuda = self.device.startswith("cuda")
        self._cuda_peak = 0
        self._cache_kwarg = cache_kwarg(model)

    def _timed(self, fn: Callable[[], Any]) -> float:
        import torch

        if not self._cuda:
            with torch.inference_mode():
                return self._host_timed(fn)
        torch.cuda.reset_peak_memory_stats(self.device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        with torch.inference_mode():
            fn()
        end.record()
        end.synchronize()
        self._cuda_peak = max(self._cuda_peak, int(torch.cuda.max_memory_allocated(self.device)))
        return begin.elapsed_time(end) / 1000.0

    def _ids(self, input_ids: Any) -> Any:
        import torch

        ids = input_ids if isinstance(input_ids, torch.Tensor) else np.asarray(input_ids)
        return torch.as_tensor(ids, dtype=torch.long, device=self.device)

    @staticmethod
    def _cache(out: Any) -> Any:
        # transformers ≥ 5.24 calls the KV cache ``cache`` (argument and output); earlier 5.x ``past_key_values``
        return out.cache if getattr(out, "cache", None) is not None else out.past_key_values

    # -- StepDecoder ---------------------------------------------------------------------------------
    def start(self, input_ids: Any, attention_mask: Any = None, inputs: Mapping[str, Any] | None = None
              ) -> tuple[Any, Any]:
        out = self.model(input_ids=self._ids(input_ids), use_cache=True)
        return out.logits, self._cache(out)

    def advance(self, next_ids: Any, state: Any) -> tuple[Any, Any]:
        out = self.model(input_ids=self._ids(next_ids), use_cache=True, **{self._cache_kwarg: state})
        return out.logits, self._cache(out)

    # -- Runner --------------------------------------------------------------------------------------
    def prefill(self, input_ids: np.ndarray) -> float:
        ids = self._ids(input_ids)
        return self._timed(lambda: self.model(input_ids=ids, use_cache=False))

    def decode(self, input_ids: np.ndarray, n_tokens: int) -> float:
        import torch

        with torch.inference_mode():
            started = self.start(input_ids)
        return self._timed(lambda: greedy_decode(self, input_ids, n_tokens + 1, started=started))

    def peak_memory(self) -> dict[str, Any] | None:
        if self._cuda:
            return {"method": "cuda_max_allocated", "bytes": self._cuda_peak} if self._cuda_peak else None
        return super().peak_memory()


def hf_greedy(model: Any, inputs: dict[str, Any], max_new_tokens: int, pad_token_id: int | None = None) -> list[int]:
    """transformers' ``generate(do_sample=False)`` for a batch of one: the generated token ids (prompt excluded;
    stops early at EOS, which is kept). The reference the exported backends' greedy loop is compared with."""
    import torch

    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             temperature=None, top_p=None, top_k=None, pad_token_id=pad_token_id)
    return out[0, inputs["input_ids"].shape[-1]:].tolist()
