"""Cross-modal condition: how much attention text queries put on vision keys, per decoder layer.

Measured without switching the model to eager attention: for the duration of a pass, the attention
function the model already uses (``sdpa``, ``eager`` …) is wrapped. The wrapper calls the original
(outputs unchanged) and recomputes the attention weights of that layer from the query/key it was
given — already normed and rotated by the model's own code, so every architecture's RoPE variant
(M-RoPE included) is handled — with the mask the model built (causal, padding, sliding window).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator


def vision_attention_share(query: Any, key: Any, mask: Any, scaling: float, vision_keys: Any,
                           softcap: float | None = None) -> Any:
    """Attention mass on vision keys per query position, averaged over heads → [batch, q_len].

    ``query`` [b, h, q, d], ``key`` [b, kv, k, d] (grouped heads repeated), ``mask`` the model's
    attention mask (bool: True = attend; float: additive) or None for plain causal attention,
    ``vision_keys`` bool [b, k].
    """
    import torch

    b, h, q_len, _ = query.shape
    k_len = key.shape[2]
    key = key.repeat_interleave(h // key.shape[1], dim=1)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    elif mask.dtype == torch.bool:
        allowed = mask[..., :k_len]
    else:
        allowed = mask[..., :k_len] > torch.finfo(mask.dtype).min / 2
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    share = (weights * vision_keys[:, None, None, :k_len].float()).sum(-1)  # [b, h, q]
    return share.mean(1)


@contextlib.contextmanager
def capture_vision_attention(spec: Any, vision_keys: Callable[[], Any], record: Callable[[int, Any], None]) -> Iterator[bool]:
    """While active, call ``record(layer_position, share[b, q])`` for every decoder attention call.

    ``vision_keys()`` returns the current batch's bool [b, k] vision mask. The wrapped function is
    the one named by the text config's ``_attn_implementation``; the original is restored on exit.
    Attention calls of other modules (the vision tower) are passed through untouched. Yields whether
    the measurement is active (False for implementations that cannot be wrapped, e.g. plain eager).
    """
    positions = {id(m): pos for pos, layer in enumerate(spec.layers) for m in layer.modules()}
    model = spec.model
    from transformers.modeling_utils import AttentionInterface

    impl = model.config.get_text_config(decoder=True)._attn_implementation or "sdpa"
    mapping = AttentionInterface._global_mapping
    original: Any = mapping.get(impl)
    if original is None:  # e.g. "eager", which models call directly when not registered
        yield False
        return

    def wrapped(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(module, query, key, value, attention_mask, *args, **kwargs)
        layer = positions.get(id(module))
        mask = vision_keys()
        if layer is not None and mask is not None and bool(mask.any()):
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            record(layer, vision_attention_share(query, key, attention_mask, scaling, mask.to(query.device),
                                                 kwargs.get("softcap")))
        return out

    mapping[impl] = wrapped
    try:
        yield True
    finally:
        mapping[impl] = original
