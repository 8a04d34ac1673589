"""Qwen2-VL / Qwen2.5-VL vision helpers that trace: the tower's grid-derived tensors computed with tensor ops.

The vision tower derives its rotary positions, attention segments (one per image frame) and, for 2.5-VL,
window-attention order from ``image_grid_thw`` with ``.tolist()`` loops, and splits attention with
data-dependent sizes. transformers 5.x lets callers pass those tensors in precomputed; the export's vision
wrapper computes them *inside* the graph with plain tensor ops (:func:`qwen_grid_kwargs`) and, while tracing,
swaps the vision attention's per-segment loop for one attention with a block-diagonal mask
(:func:`segment_attention_forward`). The graph therefore takes ``pixel_values`` and ``image_grid_thw`` like
the model and accepts any number and size of images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch


def qwen_grid_kwargs(grid_thw: "torch.Tensor", num_patches: Any, merge: int,
                      window: int | None) -> dict[str, "torch.Tensor"]:
    """The vision tower's grid-derived tensors, computed with tensor ops only (no ``.tolist()``).

    Patches arrive image by image, frame by frame, in blocks of ``merge × merge`` (one merged token each),
    merged tokens in raster order. Returns the vision tower's precomputed-kwarg names (transformers 5.x
    pops them instead of computing them):

    * ``position_ids`` [patches, 2]: (row, column) of every patch — ``get_vision_position_ids``.
    * ``cu_seqlens``: **per-patch segment ids** (one segment per image frame), not cumulative lengths;
      only :func:`segment_attention_forward` reads it.
    * with ``window`` (Qwen2.5-VL, window size in merged tokens): ``window_index`` (the merged-token
      order of ``get_vision_window_index``) and ``cu_window_seqlens`` (per-patch window ids); both
      segment-id tensors are then in window order, as the hidden states are.
    """
    import torch

    grid = grid_thw.long()
    t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
    sizes = t * h * w
    ends = sizes.cumsum(0)
    starts = ends - sizes
    idx = torch.arange(num_patches, device=grid.device)
    image = (idx[:, None] >= ends[None, :]).sum(-1)  # image of each patch
    local = idx - starts[image]
    frame_len = (h * w)[image]
    frame_id = starts[image] + local // frame_len * frame_len  # first patch of the frame: unique per frame
    r = local % frame_len
    unit = merge * merge
    merged = r // unit  # merged token within the frame
    merged_w = w[image] // merge
    rows = merged // merged_w * merge + r // merge % merge
    cols = merged % merged_w * merge + r % merge
    out = {"position_ids": torch.stack([rows, cols], dim=-1), "cu_seqlens": frame_id}
    if window is None:
        return out

    first = torch.arange(0, num_patches, unit, device=grid.device)  # first patch of every merged token
    img = image[first]
    per_frame = (h[img] // merge) * (w[img] // merge)
    q = local[first] // unit  # merged token within the image
    frame, rq = q // per_frame, q % per_frame
    mw = w[img] // merge
    mh_idx, mw_idx = rq // mw, rq % mw
    n_win_h = h[img] // merge // window + 1  # ≥ the model's window count per side (it pads by window - n % window)
    n_win_w = mw // window + 1
    window_id = img * (1 << 40) + (frame * n_win_h + mh_idx // window) * n_win_w + mw_idx // window
    order_key = window_id * (window * window) + (mh_idx % window) * window + mw_idx % window
    window_index = torch.argsort(order_key)

    def per_patch(ids: "torch.Tensor") -> "torch.Tensor":
        return ids[window_index][:, None].expand(-1, unit).reshape(-1)

    out.update({
        "window_index": window_index,
        "cu_window_seqlens": per_patch(window_id),
        "cu_seqlens": per_patch(frame_id[first]),
    })
    return out


def segment_attention_forward(self: Any, hidden_states: "torch.Tensor", cu_seqlens: "torch.Tensor",
                               position_embeddings: tuple["torch.Tensor", "torch.Tensor"] | None = None,
                               **kwargs: Any) -> "torch.Tensor":
    """Qwen2-VL / 2.5-VL vision attention with one block-diagonal mask instead of a loop over segments.

    ``cu_seqlens`` holds per-patch segment ids here (see :func:`qwen_grid_kwargs`). Same maths as the
    model's eager path: patches attend within their segment only.
    """
    import sys

    import torch

    n = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    if position_embeddings is not None:
        cos, sin = position_embeddings
        q, k = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (x.transpose(0, 1) for x in (q, k, v))  # [heads, n, head_dim]
    scores = torch.matmul(q, k.transpose(1, 2)) * self.scaling
    same = cu_seqlens[:, None] == cu_seqlens[None, :]
    scores = scores.masked_fill(~same, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v).transpose(0, 1).reshape(n, -1)
    return self.proj(out)
