"""Split-graph ONNX export of a vision-language model (the layout SmolVLM and transformers.js ship) and an
onnxruntime runner that generates from an image and a prompt.

What gets written
-----------------
``export_vlm(model_dir, out_dir)`` writes::

    out_dir/
        config.json, generation_config.json         copied from model_dir
        tokenizer / processor / chat-template files  copied when present
        onnx/vision_encoder.onnx                     vision tower + projector / connector
        onnx/embed_tokens.onnx                       token embeddings
        onnx/decoder_model_merged.onnx               language decoder + LM head, with KV cache
        onnx/<graph>.onnx_data                       a graph's weights, only when large (external data)

The graphs
----------
``vision_encoder.onnx``: the pixel inputs the model's processor produces, per architecture (see
``_SPECS``) → ``image_features`` [n_image_tokens, hidden]: exactly the rows the model scatters into the
image-token positions, in order (all images of the batch, concatenated).

``embed_tokens.onnx``: ``input_ids`` [batch_size, sequence_length] → ``inputs_embeds`` [batch_size,
sequence_length, hidden].

``decoder_model_merged.onnx``: ``inputs_embeds``, ``attention_mask`` [batch_size, total_sequence_length],
``position_ids`` and ``past_key_values.{i}.key/value`` for every decoder layer of the (slim) text config →
``logits`` and ``present.{i}.key/value``; the same KV convention as :mod:`skipit.exporters.onnx_text` (and
optimum), so a checkpoint with removed layers exports with fewer KV inputs. ``position_ids`` is
[batch_size, sequence_length], except for Qwen2-VL / Qwen2.5-VL: [3, batch_size, sequence_length], the
multimodal RoPE positions (temporal, height, width) computed *outside* the graph.

To run them: embed the prompt, run the vision encoder, write its rows into the image-token positions of
the embeddings, prefill the decoder, then decode with the cache. :class:`OrtVlmRunner` does exactly that
with numpy; for Qwen2-VL it computes the 3-D positions with a numpy port of the model's
``get_rope_index`` (images only) and continues decode steps at ``position + rope_delta``.

How it is traced
----------------
Each graph is traced separately with ``torch.onnx.export`` (dynamo by default, legacy TorchScript on
request or as ``exporter="auto"``'s fallback). What each architecture needs is data in ``_SPECS``; the
notable parts:

* LLaVA: ``get_image_features`` ends with ``list(image_features)`` over the image batch, which makes
  torch.export specialise the number of images. A forward hook packs the projector output into one row
  ([1, images × tokens, hidden]) for the trace, so the model's own code runs unchanged and the image count
  stays dynamic.
* Qwen2-VL / Qwen2.5-VL: the vision tower derives its rotary positions, attention segments (one per image
  frame) and, for 2.5-VL, window-attention order from ``image_grid_thw`` with ``.tolist()`` loops, and
  splits attention with data-dependent sizes. transformers 5.x lets callers pass those tensors in
  precomputed; the wrapper computes them *inside* the graph with plain tensor ops (:func:`_qwen_grid_kwargs`)
  and, while tracing, swaps the vision attention's per-segment loop for one attention with a
  block-diagonal mask (:func:`_segment_attention_forward`). The graph therefore takes ``pixel_values`` and
  ``image_grid_thw`` like the model and accepts any number and size of images. Every export is checked
  against the *unmodified* model's ``get_image_features``.
* Idefics3 (SmolVLM): the model's ``get_image_features`` (incl. its removal of all-zero padding images)
  traces with dynamo once the batch axis is folded into the image axis (it splits its output per batch
  row with ``.tolist()``, which would fix the batch size); the legacy exporter fails on its vision part.

Every export is verified with onnxruntime against the torch model unless ``verify=False``: vision features
on synthetic inputs of other image counts and grids than the trace used, embeddings, a left-padded prefill
plus one cached decode step, and — what a user's runtime sees — the checkpoint's own processor on images of
other sizes and aspect ratios than the trace's, one of them a prompt with two images (``PROCESSOR_CHECKS``,
per architecture also with other processor options, e.g. Idefics3's image splitting on and off): the vision
features and the prefill logits of the whole prompt through the three graphs. An input a graph cannot serve
raises :class:`~skipit.errors.ExportMismatchError` (exit code 6) naming it.

Traced constants: a float ``torch.arange`` with constant arguments is sized in double precision by torch
and in float32 by ONNX ``Range``; both exporters' dynamo route therefore emit torch's own values
(:func:`skipit.exporters.onnx_text.dynamo_translations`), which Idefics3's position buckets of a 6×6 patch
grid need. Fixed dimensions stay fixed only where the model or its processor fixes them (LLaVA's and
Idefics3's crop size): :class:`OrtVlmRunner` refuses other shapes with a message naming the input.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from skipit.compat import TRANSFORMERS_MAJOR, torchscript_patches
from skipit.errors import (
    ExportError,
    ExportMismatchError,
    InvalidOptionError,
    ModelLoadError,
    SkipitError,
    UnsupportedArchitectureError,
)
from skipit.exporters.onnx_text import (
    BATCH,
    EXAMPLE_BATCH,
    EXAMPLE_PAST,
    EXAMPLE_SEQ,
    EXTERNAL_DATA_THRESHOLD,
    KV_NAME_RE,
    ONNX_SUBDIR,
    PAST,
    PRESENT_LEN,
    SEQ,
    TOTAL,
    cache_kwarg,
    copy_side_files,
    dynamo_translations,
    forward_with_past,
    initializer_bytes,
    kv_geometry,
    kv_input_names,
    kv_output_names,
    KvGeometry,
    OnnxExportConfig,
    position_ids_from_mask,
    strip_debug_metadata,
    warnings_to_debug,
)

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

log = logging.getLogger(__name__)

VISION_FILE = "vision_encoder.onnx"
EMBED_FILE = "embed_tokens.onnx"
DECODER_FILE = "decoder_model_merged.onnx"
GRAPH_FILES = (VISION_FILE, EMBED_FILE, DECODER_FILE)

# Dimension names of the vision inputs.
NUM_IMAGES, NUM_PATCHES, IMAGE_TOKENS = "num_images", "num_patches", "num_image_tokens"
# Keys under which configs name the image placeholder token.
_IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index")


# --------------------------------------------------------------------------------------------------
# What each architecture needs (data, not branches)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _VlmSpec:
    """How to export one VLM class.

    Attributes:
        vision_inputs: names of the vision graph's inputs, in order (what the processor returns).
        vision_axes: dynamic axes of each vision input.
        example_vision: builds (trace inputs, verification inputs) for the vision graph from the model.
        routes: exporters known to produce a graph onnxruntime runs and that matches torch, per graph
            (``vision``, ``embed``, ``decoder``), in the order ``exporter="auto"`` tries them. An explicit
            ``exporter=`` is used for every graph that lists it; a graph that does not uses its own routes
            (logged with ``why``).
        pack_module: module (path from the top model) whose output is packed into one row during the trace,
            so the model's own ``list(features)`` over images does not fix the image count.
        tower: call this module (path from the top model) as ``tower(pixel_values, grid_thw=…)`` and take
            its ``pooler_output``, instead of ``get_image_features`` (which splits the features per image
            with ``.tolist()``: the trace would fix the image count).
        fold_batch: fold the batch axis of every vision input into its image axis before calling
            ``get_image_features`` ([batch, images, …] → [1, batch × images, …]); the concatenated features
            are the same rows, and the model's per-row ``split(….tolist())`` then has one part, so the
            trace does not fix the batch size.
        qwen_grid: compute the vision tower's grid-derived helper tensors inside the graph and run its
            attention with a block-diagonal mask (see module docstring).
        mrope: the decoder takes 3-D ``position_ids`` [3, batch, seq] (multimodal RoPE).
        processor_options: processor call options the export is verified with, each on every image set of
            ``PROCESSOR_CHECKS`` (options that change what reaches the vision graph, e.g. the number of crops).
        why: what was measured, for the routes left out.
    """

    vision_inputs: tuple[str, ...]
    vision_axes: Mapping[str, Mapping[int, str]]
    example_vision: Callable[[Any], tuple[dict[str, "torch.Tensor"], list[dict[str, "torch.Tensor"]]]]
    routes: Mapping[str, tuple[str, ...]]
    pack_module: str | None = None
    tower: str | None = None
    fold_batch: bool = False
    qwen_grid: bool = False
    mrope: bool = False
    processor_options: tuple[Mapping[str, Any], ...] = ({},)
    why: str = ""


def _square_size(model: Any) -> int:
    return int(model.config.vision_config.image_size)


def _llava_examples(model: Any) -> tuple[dict, list[dict]]:
    import torch

    s = _square_size(model)
    gen = torch.Generator().manual_seed(0)
    make = lambda n: {"pixel_values": torch.randn(n, 3, s, s, generator=gen)}  # noqa: E731
    return make(2), [make(1), make(3)]


def _idefics3_examples(model: Any) -> tuple[dict, list[dict]]:
    """[batch, images, 3, S, S] + pixel mask; one padding (all-zero) image and a partly padded image."""
    import torch

    s = _square_size(model)
    gen = torch.Generator().manual_seed(0)

    def make(batch: int, images: int, pad_last: bool) -> dict:
        pixels = torch.randn(batch, images, 3, s, s, generator=gen)
        mask = torch.ones(batch, images, s, s, dtype=torch.long)
        if pad_last:  # row 0 has one image fewer: its last slot is a padding image (zeros, mask 0) …
            pixels[0, -1] = 0
            mask[0, -1] = 0
            pixels[-1, 0, :, :, s // 2:] = 0  # … and the last row's first image is narrower than the batch
            mask[-1, 0, :, s // 2:] = 0
        return {"pixel_values": pixels, "pixel_attention_mask": mask}

    return make(2, 3, True), [make(1, 1, False), make(2, 2, True)]


def _qwen_examples(model: Any) -> tuple[dict, list[dict]]:
    """Flattened patches for images of several grid sizes ([t, h, w] in patches, h and w multiples of the merge)."""
    import torch

    vc = model.config.vision_config
    m = int(vc.spatial_merge_size)
    width = int(vc.in_channels) * int(vc.temporal_patch_size) * int(vc.patch_size) ** 2
    gen = torch.Generator().manual_seed(0)

    def make(grids: list[tuple[int, int, int]]) -> dict:
        grid = torch.tensor([[t, h * m, w * m] for t, h, w in grids], dtype=torch.long)
        n = int(grid.prod(-1).sum())
        return {"pixel_values": torch.randn(n, width, generator=gen), "image_grid_thw": grid}

    return make([(1, 2, 3), (1, 3, 2)]), [make([(1, 2, 2)]), make([(1, 1, 2), (1, 3, 4), (1, 2, 2)])]


_ALL = ("dynamo", "legacy")
# Qwen2-VL and Qwen2.5-VL share the vision interface: flattened patches + a [t, h, w] grid per image.
_QWEN_VL = _VlmSpec(
    vision_inputs=("pixel_values", "image_grid_thw"),
    vision_axes={"pixel_values": {0: NUM_PATCHES}, "image_grid_thw": {0: NUM_IMAGES}},
    example_vision=_qwen_examples,
    routes={"vision": _ALL, "embed": _ALL, "decoder": _ALL},
    tower="model.visual",
    qwen_grid=True,
    mrope=True,
)

_SPECS: dict[str, _VlmSpec] = {
    # get_image_features ends with list(features) over the image batch: pack the projector output instead.
    "LlavaForConditionalGeneration": _VlmSpec(
        vision_inputs=("pixel_values",),
        vision_axes={"pixel_values": {0: NUM_IMAGES}},
        example_vision=_llava_examples,
        routes={"vision": _ALL, "embed": _ALL, "decoder": _ALL},
        pack_module="model.multi_modal_projector",
    ),
    # The vision tower is called directly with grid helpers computed in-graph (get_image_features would split
    # per image with .tolist()); with those helpers even the legacy tracer keeps the image grid dynamic.
    "Qwen2VLForConditionalGeneration": _QWEN_VL,
    "Qwen2_5_VLForConditionalGeneration": _QWEN_VL,  # same vision interface as Qwen2-VL
    # get_image_features splits its output per batch row with .tolist(): the batch is folded into the images.
    "Idefics3ForConditionalGeneration": _VlmSpec(
        vision_inputs=("pixel_values", "pixel_attention_mask"),
        vision_axes={"pixel_values": {0: BATCH, 1: NUM_IMAGES}, "pixel_attention_mask": {0: BATCH, 1: NUM_IMAGES}},
        example_vision=_idefics3_examples,
        routes={"vision": ("dynamo",), "embed": _ALL, "decoder": _ALL},
        fold_batch=True,
        # splitting on: each image becomes up to N×M crops plus the global image; off: one resized image
        processor_options=({"do_image_splitting": True}, {"do_image_splitting": False}),
        # measured (torch 2.13): the TorchScript exporter fails on the vision part, "Unsupported: ONNX export
        # of operator Unfold, input size not accessible" (the pixel mask of the real images, selected by a
        # data-dependent mask, has no static size); dynamo traces it, padding-image removal included.
        why="the legacy (TorchScript) exporter cannot export the vision part's Unfold of the pixel mask",
    ),
}


def supported_vlm_architectures() -> list[str]:
    """VLM classes :func:`export_vlm` knows how to split."""
    return sorted(_SPECS)


# --------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL vision helpers, traceable
# --------------------------------------------------------------------------------------------------
def _qwen_grid_kwargs(grid_thw: "torch.Tensor", num_patches: Any, merge: int,
                      window: int | None) -> dict[str, "torch.Tensor"]:
    """The vision tower's grid-derived tensors, computed with tensor ops only (no ``.tolist()``).

    Patches arrive image by image, frame by frame, in blocks of ``merge × merge`` (one merged token each),
    merged tokens in raster order. Returns the vision tower's precomputed-kwarg names (transformers 5.x
    pops them instead of computing them):

    * ``position_ids`` [patches, 2]: (row, column) of every patch — ``get_vision_position_ids``.
    * ``cu_seqlens``: **per-patch segment ids** (one segment per image frame), not cumulative lengths;
      only :func:`_segment_attention_forward` reads it.
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


def _segment_attention_forward(self: Any, hidden_states: "torch.Tensor", cu_seqlens: "torch.Tensor",
                               position_embeddings: tuple["torch.Tensor", "torch.Tensor"] | None = None,
                               **kwargs: Any) -> "torch.Tensor":
    """Qwen2-VL / 2.5-VL vision attention with one block-diagonal mask instead of a loop over segments.

    ``cu_seqlens`` holds per-patch segment ids here (see :func:`_qwen_grid_kwargs`). Same maths as the
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


# --------------------------------------------------------------------------------------------------
# Wrappers (explicit signatures for the exporters)
# --------------------------------------------------------------------------------------------------
def _resolve(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


@contextlib.contextmanager
def _trace_patches(model: Any, spec: _VlmSpec) -> Iterator[None]:
    """Reversible changes the vision trace needs (see module docstring); nothing for other graphs."""
    handles = []
    patched: list[tuple[type, Any]] = []
    try:
        if spec.pack_module:
            def pack(_module: Any, _inputs: Any, output: "torch.Tensor") -> "torch.Tensor":
                return output.reshape(1, -1, output.shape[-1])

            handles.append(_resolve(model, spec.pack_module).register_forward_hook(pack))
        if spec.qwen_grid:
            cls = type(_resolve(model, spec.tower or "model.visual").blocks[0].attn)  # the vision attention class
            patched.append((cls, cls.forward))
            cls.forward = _segment_attention_forward
        yield
    finally:
        for handle in handles:
            handle.remove()
        for cls, original in patched:
            cls.forward = original


def _vision_wrapper(model: Any, spec: _VlmSpec) -> "torch.nn.Module":
    """pixel inputs → image_features [n_image_tokens, hidden] through the model's ``get_image_features``
    (or its vision tower, see ``_VlmSpec.tower``)."""
    import torch

    vision_cfg = model.config.vision_config
    merge = int(getattr(vision_cfg, "spatial_merge_size", 1) or 1)
    window = getattr(vision_cfg, "window_size", None)
    window_merged = int(window) // merge // int(vision_cfg.patch_size) if window else None
    second = spec.vision_inputs[1] if len(spec.vision_inputs) > 1 else None

    class VisionEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
            if spec.tower:
                tower = _resolve(self.model, spec.tower)
                kwargs = _qwen_grid_kwargs(aux, pixel_values.shape[0], merge, window_merged) if spec.qwen_grid else {}
                out = tower(pixel_values.to(tower.dtype), grid_thw=aux, return_dict=True, **kwargs)
            else:
                if spec.fold_batch:
                    pixel_values = pixel_values.reshape(1, -1, *pixel_values.shape[2:])
                    aux = aux.reshape(1, -1, *aux.shape[2:]) if aux is not None else None
                kwargs = {second: aux} if second is not None else {}
                out = self.model.model.get_image_features(pixel_values, return_dict=True, **kwargs)
            features = out.pooler_output
            if isinstance(features, (list, tuple)):
                features = torch.cat(list(features), dim=0)
            return features.reshape(-1, features.shape[-1])

    return VisionEncoder().eval()


def _embed_wrapper(model: Any) -> "torch.nn.Module":
    import torch

    class EmbedTokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = model.get_input_embeddings()

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.embed(input_ids)

    return EmbedTokens().eval()


def _decoder_wrapper(model: Any) -> "torch.nn.Module":
    """inputs_embeds + mask + positions + flat past → logits + flat present (the model's own forward)."""
    import torch

    kwarg = cache_kwarg(model)

    class DecoderWithPast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            inputs_embeds: torch.Tensor,
            attention_mask: torch.Tensor,
            position_ids: torch.Tensor,
            past_key_values: list[tuple[torch.Tensor, torch.Tensor]],
        ) -> tuple[torch.Tensor, ...]:
            return forward_with_past(self.model, kwarg, past_key_values, inputs_embeds=inputs_embeds,
                                     attention_mask=attention_mask, position_ids=position_ids)

    return DecoderWithPast().eval()


# --------------------------------------------------------------------------------------------------
# Graph descriptions and the generic tracer
# --------------------------------------------------------------------------------------------------
@dataclass
class _Graph:
    """One graph to export: the wrapper, example args and I/O names with their dynamic axes."""

    key: str  # "vision" / "embed" / "decoder" (the routes key)
    file: str
    wrapper: Any
    args: tuple
    input_names: list[str]
    output_names: list[str]
    axes: dict[str, dict[int, str]]  # inputs and outputs
    patches: Callable[[], Any] = field(default=contextlib.nullcontext)


def _dynamic_shapes(args: tuple, input_names: list[str], axes: Mapping[str, Mapping[int, str]]) -> Any:
    """torch.export dynamic_shapes mirroring ``args`` (nested lists/tuples too), from the flat axes.

    Every listed axis is ``Dim.AUTO``: torch.export infers which axes are equal and the relations the
    model implies (e.g. patches divisible by the merge size) instead of failing on them; the readable
    names are put on the graph afterwards (:func:`_rename_dims`).
    """
    import torch
    from torch.utils import _pytree as pytree

    leaves, spec = pytree.tree_flatten(args)
    if len(leaves) != len(input_names):
        raise AssertionError(f"{len(leaves)} example tensors for {len(input_names)} input names")  # pragma: no cover
    per_leaf = [{d: torch.export.Dim.AUTO for d in axes.get(name, {})} or None
                for name in input_names]
    return pytree.tree_unflatten(per_leaf, spec)


def _export_graph(graph: _Graph, route: str, config: OnnxExportConfig, tmp: Path) -> Any:
    """Trace ``graph`` with one exporter; return an onnx_ir model with the final names."""
    import onnx_ir as ir
    import torch

    with warnings_to_debug(), torch.no_grad(), graph.patches():
        if route == "dynamo":
            program = torch.onnx.export(
                graph.wrapper, graph.args, dynamo=True,
                dynamic_shapes=_dynamic_shapes(graph.args, graph.input_names, graph.axes),
                input_names=graph.input_names, output_names=graph.output_names,
                opset_version=config.opset, optimize=True, verbose=False,
                custom_translation_table=dynamo_translations(),
            )
            model_ir = program.model
            _rename_dims(model_ir, graph.axes)
            return model_ir
        path = tmp / f"legacy-{graph.file}"
        with torchscript_patches():
            torch.onnx.export(
                graph.wrapper, graph.args, str(path), dynamo=False,
                input_names=graph.input_names, output_names=graph.output_names,
                dynamic_axes={k: dict(v) for k, v in graph.axes.items()},
                opset_version=config.opset, do_constant_folding=True,
            )
        return ir.load(path)


def _rename_dims(model_ir: Any, axes: Mapping[str, Mapping[int, str]]) -> None:
    """Give dynamo's symbolic dims (s0, s1 …) the readable names of ``axes`` (inputs and outputs)."""
    import onnx_ir as ir

    values = {v.name: v for v in (*model_ir.graph.inputs, *model_ir.graph.outputs)}
    for name, dims in axes.items():
        value = values.get(name)
        if value is None or value.shape is None:
            continue
        shape = list(value.shape)
        for d, label in dims.items():
            if d < len(shape) and not isinstance(shape[d], int):
                shape[d] = ir.SymbolicDim(label)
        value.shape = ir.Shape(shape)


def check_graph_io(model_ir: Any, graph: _Graph) -> None:
    got_in = [v.name for v in model_ir.graph.inputs]
    got_out = [v.name for v in model_ir.graph.outputs]
    if got_in != graph.input_names or got_out != graph.output_names:
        raise ExportError(
            f"{graph.file}: exported graph has inputs {got_in[:5]}… ({len(got_in)}) and outputs {got_out[:3]}… "
            f"({len(got_out)}); expected {graph.input_names[:5]}… ({len(graph.input_names)}) and "
            f"{graph.output_names[:3]}… ({len(graph.output_names)}). This is a bug in skipit's exporter"
        )


def _routes(arch: str, spec: _VlmSpec, key: str, config: OnnxExportConfig) -> list[str]:
    """Exporters to try for one graph: the requested one where the table offers it, else the table's."""
    known = list(spec.routes[key])
    if config.exporter == "auto" or config.exporter in known:
        return known if config.exporter == "auto" else [config.exporter]
    log.warning("%s: the %s exporter does not work for its %s graph (%s); using %s for that graph",
                arch, config.exporter, key, spec.why, known[0])
    return known


def _trace(graph: _Graph, routes: list[str], config: OnnxExportConfig, tmp: Path) -> tuple[Any, str]:
    errors: list[str] = []
    for route in routes:
        t0 = time.perf_counter()
        try:
            model_ir = _export_graph(graph, route, config, tmp)
        except Exception as exc:  # noqa: BLE001 - any tracer failure is reported, or falls back
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            errors.append(f"{route}: {type(exc).__name__}: {first}")
            if route != routes[-1]:
                log.warning("%s: %s export failed (%s); trying %s", graph.file, route, first, routes[-1])
                continue
            raise ExportError(f"ONNX export of {graph.file} failed: " + "; ".join(errors)) from exc
        log.info("%s: %s exporter traced the graph in %.1f s", graph.file, route, time.perf_counter() - t0)
        check_graph_io(model_ir, graph)
        return model_ir, route
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------------------------------
# Example inputs and graph descriptions
# --------------------------------------------------------------------------------------------------
def _decoder_args(geo: KvGeometry, hidden: int, dtype: "torch.dtype", mrope: bool, batch: int, seq: int,
                  past: int, left_pad: int = 0, seed: int = 0) -> tuple:
    """(inputs_embeds, attention_mask, position_ids, past); row 0 left-padded by ``left_pad``.

    Multimodal-RoPE positions differ per axis (as around an image) so every section is exercised."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, seq, hidden, generator=gen).to(dtype)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    mask[0, :left_pad] = 0
    positions = torch.from_numpy(position_ids_from_mask(mask.numpy(), seq))
    if mrope:
        positions = torch.stack([positions, positions // 2, positions + 1])
    kv = [
        (torch.randn(batch, geo.kv_heads, past, geo.head_dim, generator=gen).to(dtype),
         torch.randn(batch, geo.kv_heads, past, geo.head_dim, generator=gen).to(dtype))
        for _ in range(geo.num_layers)
    ]
    return embeds, mask, positions, kv


def _graphs(model: Any, spec: _VlmSpec, geo: KvGeometry, dtype: "torch.dtype") -> list[_Graph]:
    import torch

    hidden = int(model.config.get_text_config(decoder=True).hidden_size)
    trace_vision, _ = spec.example_vision(model)
    vision_args = tuple(_cast(trace_vision[n], dtype) for n in spec.vision_inputs)
    vision_axes = {**{k: dict(v) for k, v in spec.vision_axes.items()}, "image_features": {0: IMAGE_TOKENS}}
    ids = torch.randint(0, geo.vocab_size, (EXAMPLE_BATCH, EXAMPLE_SEQ), generator=torch.Generator().manual_seed(0))
    positions_axes = {1: BATCH, 2: SEQ} if spec.mrope else {0: BATCH, 1: SEQ}
    decoder_axes: dict[str, dict[int, str]] = {
        "inputs_embeds": {0: BATCH, 1: SEQ},
        "attention_mask": {0: BATCH, 1: TOTAL},
        "position_ids": positions_axes,
        "logits": {0: BATCH, 1: SEQ},
    }
    decoder_axes.update({n: {0: BATCH, 2: PAST} for n in kv_input_names(geo.num_layers)})
    decoder_axes.update({n: {0: BATCH, 2: PRESENT_LEN} for n in kv_output_names(geo.num_layers)})
    return [
        _Graph("vision", VISION_FILE, _vision_wrapper(model, spec), vision_args, list(spec.vision_inputs),
               ["image_features"], vision_axes, patches=lambda: _trace_patches(model, spec)),
        _Graph("embed", EMBED_FILE, _embed_wrapper(model), (ids,), ["input_ids"], ["inputs_embeds"],
               {"input_ids": {0: BATCH, 1: SEQ}, "inputs_embeds": {0: BATCH, 1: SEQ}}),
        _Graph("decoder", DECODER_FILE, _decoder_wrapper(model),
               _decoder_args(geo, hidden, dtype, spec.mrope, EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST),
               ["inputs_embeds", "attention_mask", "position_ids", *kv_input_names(geo.num_layers)],
               ["logits", *kv_output_names(geo.num_layers)], decoder_axes),
    ]


def _cast(tensor: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor":
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


# --------------------------------------------------------------------------------------------------
# Loading, saving, verification
# --------------------------------------------------------------------------------------------------
def _load(model_dir: Path, config: OnnxExportConfig) -> tuple[Any, str, _VlmSpec]:
    import torch
    import transformers

    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json: pass a Hugging Face checkpoint directory")
    arch = (json.loads(path.read_text()).get("architectures") or [None])[0]
    spec = _SPECS.get(arch)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"{arch!r} has no split-graph ONNX export; supported VLMs: {', '.join(supported_vlm_architectures())}. "
            f"Text decoders export with skipit.exporters.onnx_text"
        )
    try:
        model = getattr(transformers, arch).from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=config.attn_implementation
        )
    except (ValueError, OSError, KeyError, AttributeError) as exc:
        raise ModelLoadError(f"cannot load {model_dir} as {arch} for ONNX export: {exc}") from exc
    return model.eval(), arch, spec


def _copy_files(model_dir: Path, dest: Path) -> None:
    """onnx_text's config/tokenizer files plus the processor files a VLM needs."""
    from skipit.compressor.loading import PROCESSOR_FILE_PATTERNS

    copy_side_files(model_dir, dest)
    for pattern in PROCESSOR_FILE_PATTERNS:
        for src in model_dir.glob(pattern):
            if src.is_file() and not (dest / src.name).exists():
                shutil.copy2(src, dest / src.name)


def _save(model_ir: Any, path: Path, external: bool | None) -> None:
    import onnx_ir as ir

    if external is None:
        external = initializer_bytes(model_ir) > EXTERNAL_DATA_THRESHOLD
    if external:
        ir.save(model_ir, path, external_data=path.name + "_data")
    else:
        ir.save(model_ir, path)


def move_into_place(staged: Path, out_dir: Path) -> None:
    """Move staged files under out_dir (atomic per file): weights first, graphs after, decoder last."""
    onnx_dir = out_dir / ONNX_SUBDIR
    onnx_dir.mkdir(parents=True, exist_ok=True)
    for name in GRAPH_FILES:  # an earlier, larger export's weights must not linger
        stale = onnx_dir / (name + "_data")
        if stale.exists() and not (staged / ONNX_SUBDIR / stale.name).exists():
            stale.unlink()
    order = {name: i + 1 for i, name in enumerate(GRAPH_FILES)}
    files = sorted((p for p in staged.rglob("*") if p.is_file()), key=lambda p: order.get(p.name, 0))
    for src in files:
        dst = out_dir / src.relative_to(staged)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


def _tolerance(config: OnnxExportConfig, reference: "np.ndarray") -> float:
    import numpy as np

    if config.verify_atol is not None:
        return config.verify_atol
    return 1e-3 if config.dtype == "fp32" else 2e-2 * max(1.0, float(np.abs(reference).max()))


# Image sets of the processor-driven verification, as (width, height) per image of one prompt: other sizes and
# aspect ratios than the trace's square example, and two images in one prompt. Small: processors resize anyway.
PROCESSOR_CHECKS: tuple[tuple[tuple[int, int], ...], ...] = (((61, 37),), ((40, 90),), ((52, 52), (90, 33)))
_CHECK_TEXT = "What is in the picture?"


@dataclass
class _Errors:
    """Worst error per graph over the verification inputs, and which input it was."""

    worst: dict[str, tuple[float, float, str]] = field(default_factory=dict)  # key → (error, tolerance, input)

    def add(self, key: str, got: "np.ndarray", ref: "np.ndarray", config: OnnxExportConfig, what: str) -> None:
        import numpy as np

        err = float(np.abs(got - ref).max()) if got.shape == ref.shape and np.isfinite(got).all() else float("inf")
        atol = _tolerance(config, ref)
        if key not in self.worst or err / atol > self.worst[key][0] / self.worst[key][1]:
            self.worst[key] = (err, atol, what)

    def raise_on_mismatch(self) -> dict[str, float]:
        for key, (err, atol, what) in self.worst.items():
            log.info("ONNX %s vs torch: max abs error %.3g (tolerance %.3g; worst on %s)", key, err, atol, what)
            if not err <= atol:
                raise ExportMismatchError(
                    f"exported {key} differs from the torch model on {what}: max abs error {err:.3g} > {atol:.3g}. "
                    f"Try another exporter, or pass verify_atol= if the difference is expected")
        return {k: v[0] for k, v in self.worst.items()}


def _served(what: str, run: Callable[[], Any]) -> Any:
    """``run()``; an onnxruntime failure becomes an :class:`ExportMismatchError` naming the input."""
    try:
        return run()
    except ExportMismatchError as exc:  # the runner refused an input shape: say which verification input it was
        raise ExportMismatchError(f"{exc} (verifying the export on {what})") from None
    except SkipitError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportMismatchError(
            f"the exported graphs cannot serve {what}: onnxruntime: {first}. This is a bug in skipit's export of "
            f"this architecture (something of the trace input was fixed in the graph); please report it") from None


def _shapes(inputs: Mapping[str, Any], names: Sequence[str]) -> str:
    return ", ".join(f"{n} {list(inputs[n].shape)}" for n in names if n in inputs)


def _reference_features(model: Any, inputs: Mapping[str, "torch.Tensor"]) -> "np.ndarray":
    """The unpatched model's image features for the vision inputs, as the rows the graph returns."""
    import torch

    with torch.no_grad():
        ref = model.model.get_image_features(**inputs, return_dict=True).pooler_output
    ref = torch.cat(list(ref)) if isinstance(ref, (list, tuple)) else ref
    return ref.reshape(-1, ref.shape[-1]).float().numpy()


def _check_vision(model: Any, spec: _VlmSpec, runner: "OrtVlmRunner", inputs: Mapping[str, "torch.Tensor"],
                  errors: _Errors, config: OnnxExportConfig, what: str) -> None:
    vision = {n: inputs[n] for n in spec.vision_inputs if n in inputs}
    got = _served(f"{what} ({_shapes(vision, spec.vision_inputs)})",
                  lambda: runner.image_features({k: v.numpy() for k, v in vision.items()}))
    errors.add("vision graph", got, _reference_features(model, vision), config, what)


def _check_decoder(model: Any, spec: _VlmSpec, geo: KvGeometry, runner: "OrtVlmRunner", errors: _Errors,
                   config: OnnxExportConfig) -> None:
    """Embeddings, then a left-padded prefill and one cached decode step on random embeddings."""
    import numpy as np
    import torch
    from transformers import DynamicCache

    ids = torch.randint(0, geo.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_embeds = model.get_input_embeddings()(ids).numpy()
    errors.add("embed graph", runner.embed(ids.numpy()), ref_embeds, config, "random token ids [2, 6]")

    hidden = int(model.config.get_text_config(decoder=True).hidden_size)
    embeds, mask, positions, _ = _decoder_args(geo, hidden, torch.float32, spec.mrope, 2, 6, 0, left_pad=2, seed=1)
    embeds2, _, _, _ = _decoder_args(geo, hidden, torch.float32, spec.mrope, 2, 1, 0, seed=2)
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    positions2 = positions[..., -1:] + 1
    with torch.no_grad():
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        kw = {cache_kwarg(model): cache, "use_cache": True}
        ref1 = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **kw).logits.numpy()
        ref2 = model(inputs_embeds=embeds2, attention_mask=mask2, position_ids=positions2, **kw).logits.numpy()
    what = "a left-padded prefill [2, 6] and one cached decode step"
    logits, present = _served(what, lambda: runner.decode_step(embeds.numpy(), mask.numpy(), positions.numpy()))
    logits2, _ = _served(what, lambda: runner.decode_step(embeds2.numpy(), mask2.numpy(), positions2.numpy(), present))
    real = mask.numpy()[:, :, None].astype(bool)  # padding positions are not compared
    errors.add("decoder graph", np.where(real, logits, 0), np.where(real, ref1, 0), config, what)
    errors.add("decoder graph", logits2, ref2, config, what)


def _processor_inputs(model_dir: Path, arch: str, spec: _VlmSpec) -> list[tuple[str, dict[str, "torch.Tensor"]]]:
    """(description, processor output) for every image set of ``PROCESSOR_CHECKS`` × ``spec.processor_options``;
    empty (with a warning) when the checkpoint has no processor."""
    import numpy as np
    from PIL import Image

    from skipit.compressor.arch import REGISTRY
    from skipit.compressor.loading import LoadOptions, load_processor

    try:
        processor, _ = load_processor(model_dir, True, LoadOptions())
    except ModelLoadError as exc:
        processor, reason = None, str(exc)
    else:
        reason = "it has a tokenizer but no image processor"
    if processor is None or not hasattr(processor, "image_processor"):
        log.warning("%s: %s; the export is verified on synthetic pixel inputs only", model_dir, reason)
        return []
    slot = REGISTRY[arch].image_prompt.format(text="")
    rng = np.random.default_rng(0)
    cases = []
    for sizes in PROCESSOR_CHECKS:
        images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
        for options in spec.processor_options:
            what = (f"a {sizes[0][0]}×{sizes[0][1]} image" if len(sizes) == 1 else
                    f"{len(sizes)} images ({', '.join(f'{w}×{h}' for w, h in sizes)}) in one prompt")
            what += "".join(f", {k}={v}" for k, v in options.items())
            inputs = processor(text=[slot * len(images) + _CHECK_TEXT], images=[images], return_tensors="pt", **options)
            cases.append((what, dict(inputs)))
    return cases


def _check_processor_inputs(model: Any, spec: _VlmSpec, runner: "OrtVlmRunner", cases: list[tuple[str, dict]],
                            errors: _Errors, config: OnnxExportConfig) -> None:
    """Per case: the vision features, and the prefill logits of the whole prompt through the three graphs."""
    import torch

    for what, inputs in cases:
        _check_vision(model, spec, runner, inputs, errors, config, what)
        with torch.no_grad():
            ref = model(**inputs).logits.float().numpy()
        ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
        got = _served(f"{what} ({_shapes(inputs, ('input_ids', *spec.vision_inputs))})",
                      lambda: runner.prefill(ids, inputs, mask)[0])
        errors.add("image+text prefill", got, ref, config, what)


def _verify(model: Any, model_dir: Path, arch: str, spec: _VlmSpec, geo: KvGeometry, onnx_dir: Path,
            config: OnnxExportConfig) -> dict[str, float]:
    """Compare the graphs with the (unpatched, fp32) torch model; raise ExportMismatchError on a mismatch or on
    an input they cannot serve. Returns the worst error per check."""
    runner = OrtVlmRunner(onnx_dir.parent, onnx_dir=onnx_dir)
    errors = _Errors()
    _, synthetic = spec.example_vision(model)
    for i, inputs in enumerate(synthetic):
        _check_vision(model, spec, runner, inputs, errors, config, f"synthetic vision input {i + 1}")
    _check_decoder(model, spec, geo, runner, errors, config)
    _check_processor_inputs(model, spec, runner, _processor_inputs(model_dir, arch, spec), errors, config)
    return errors.raise_on_mismatch()


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def export_vlm(
    model_dir: str | os.PathLike, out_dir: str | os.PathLike, config: OnnxExportConfig = OnnxExportConfig()
) -> dict[str, Path]:
    """Export a VLM checkpoint to ``out_dir/onnx/{vision_encoder,embed_tokens,decoder_model_merged}.onnx``.

    Also copies config, generation config, tokenizer and processor files into ``out_dir``. The decoder's
    KV inputs follow the checkpoint's text config (a slim checkpoint gets fewer). Files are built in a
    temporary folder inside ``out_dir`` and moved into place at the end.

    Args:
        model_dir: checkpoint directory of a class in :func:`supported_vlm_architectures`.
        out_dir: where to write; must not hold an export already unless ``config.overwrite``.
        config: export options (shared with the text exporter). ``exporter="auto"`` tries, per graph, the
            routes ``_SPECS`` lists; an explicit exporter is used for every graph it works for, the others
            use their listed route (a warning says so). Each graph records its exporter in the ONNX
            metadata (``skipit.exporter``).

    Returns:
        ``{"vision_encoder": path, "embed_tokens": path, "decoder_model_merged": path}``.

    Raises:
        ModelLoadError / UnsupportedArchitectureError: ``model_dir`` is not a loadable, supported VLM.
        OutputExistsError: ``out_dir`` already holds an export and ``overwrite`` is False.
        ExportError: tracing failed, or a graph does not match torch within tolerance.
    """
    import copy

    import torch

    from skipit.errors import OutputExistsError

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if TRANSFORMERS_MAJOR < 5:
        import transformers

        # The vision graphs call 5.x interfaces: get_image_features(return_dict=True).pooler_output, and
        # Qwen2-VL vision towers that take their grid helper tensors precomputed (see the module docstring).
        raise ExportError(f"VLM split-graph export needs transformers 5.x (this is {transformers.__version__}); "
                          "text decoders export on 4.57 too")
    targets = {Path(name).stem: out_dir / ONNX_SUBDIR / name for name in GRAPH_FILES}
    existing = [p for p in targets.values() if p.exists()]
    if existing and not config.overwrite:
        raise OutputExistsError(f"{existing[0]} exists; choose another out_dir or pass overwrite=True (--overwrite)")

    started = time.perf_counter()
    model, arch, spec = _load(model_dir, config)
    geo = kv_geometry(model)
    dtype = torch.float16 if config.dtype == "fp16" else torch.float32
    traced = copy.deepcopy(model).to(dtype) if config.dtype == "fp16" else model
    graphs = _graphs(traced, spec, geo, dtype)
    routes = {g.key: _routes(arch, spec, g.key, config) for g in graphs}
    log.info("exporting %s (%s, %d decoder layers) to split ONNX graphs, opset %d, %s",
             model_dir, arch, geo.num_layers, config.opset, config.dtype)

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".skipit-onnx-", dir=out_dir) as tmp_name:
        tmp = Path(tmp_name)
        staged = tmp / "staged"
        (staged / ONNX_SUBDIR).mkdir(parents=True)
        for graph in graphs:
            model_ir, route = _trace(graph, routes[graph.key], config, tmp)
            strip_debug_metadata(model_ir)
            model_ir.metadata_props.update({
                "skipit.exporter": route,
                "skipit.architecture": arch,
                "skipit.num_hidden_layers": str(geo.num_layers),
                "skipit.dtype": config.dtype,
            })
            _save(model_ir, staged / ONNX_SUBDIR / graph.file, config.external_data)
            del model_ir
        _copy_files(model_dir, staged)
        if config.verify:
            _verify(model, model_dir, arch, spec, geo, staged / ONNX_SUBDIR, config)
        move_into_place(staged, out_dir)

    log.info("split ONNX export of %s done in %.1f s: %s", model_dir.name, time.perf_counter() - started,
             out_dir / ONNX_SUBDIR)
    return targets


# --------------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------------
def find_split_export(path: str | os.PathLike) -> tuple[Path, Path] | None:
    """``(folder with config.json, folder with the three graphs)`` of a split export at ``path`` — the export
    folder, its ``onnx/`` folder or one of its graph files — or None when ``path`` is no split export."""
    path = Path(path)
    if path.is_file():
        candidates = [path.parent] if path.name in GRAPH_FILES else []
    else:  # skipit-compress writes OUT/onnx/{config.json, onnx/*.onnx}
        candidates = [path / ONNX_SUBDIR, path, path / ONNX_SUBDIR / ONNX_SUBDIR]
    for onnx_dir in candidates:
        if all((onnx_dir / name).is_file() for name in GRAPH_FILES):
            for root in (onnx_dir.parent, onnx_dir):
                if (root / "config.json").is_file():
                    return root, onnx_dir
            raise ExportError(f"{onnx_dir} holds split VLM graphs but no config.json beside them (looked in "
                              f"{onnx_dir.parent} and {onnx_dir}); give the folder export_vlm wrote")
    return None


_NP_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(bool)": "bool"}


def mrope_position_ids(input_ids: "np.ndarray", image_grid_thw: "np.ndarray | None", image_token_id: int,
                       spatial_merge_size: int, attention_mask: "np.ndarray | None" = None,
                       video_token_id: int | None = None) -> tuple["np.ndarray", "np.ndarray"]:
    """numpy port of Qwen2-VL / Qwen2.5-VL ``get_rope_index`` for text + images.

    Text tokens count up on all three axes; the tokens of an image (consecutive ``image_token_id``s) take
    (temporal, row, column) positions of its merged grid offset by the current position, after which
    counting resumes at ``start + max(rows, cols)``. Padding (mask 0) gets position 0.

    Returns:
        ``(position_ids [3, batch, seq], rope_deltas [batch, 1])``; a cached step at running text
        position ``p`` (count of attended tokens minus one) uses ``p + rope_delta`` on all three axes.
    """
    import numpy as np

    ids = np.asarray(input_ids, dtype=np.int64)
    batch, seq = ids.shape
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    grids = iter([] if image_grid_thw is None else np.asarray(image_grid_thw, dtype=np.int64).tolist())
    positions = np.zeros((3, batch, seq), dtype=np.int64)
    deltas = np.zeros((batch, 1), dtype=np.int64)
    for b in range(batch):
        keep = mask[b].astype(bool)
        tokens = ids[b][keep]
        if video_token_id is not None and (tokens == video_token_id).any():
            raise InvalidOptionError("video inputs are not supported by the ONNX VLM runner (images only)")
        pieces, current, i = [], 0, 0
        while i < len(tokens):
            j = i
            is_image = tokens[i] == image_token_id
            while j < len(tokens) and (tokens[j] == image_token_id) == is_image:
                j += 1
            if not is_image:
                pieces.append(np.broadcast_to(np.arange(j - i) + current, (3, j - i)))
                current += j - i
            else:
                try:
                    t, h, w = next(grids)
                except StopIteration:
                    raise InvalidOptionError("the prompt has more image-token runs than image_grid_thw rows") from None
                gh, gw = h // spatial_merge_size, w // spatial_merge_size
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
                block = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + current
                if block.shape[1] != j - i:
                    raise InvalidOptionError(
                        f"an image run has {j - i} image tokens but its grid {t}×{h}×{w} gives {block.shape[1]}")
                pieces.append(block)
                current += max(h, w) // spatial_merge_size
            i = j
        flat = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        positions[:, b, keep] = flat
        deltas[b, 0] = (flat.max() + 1 - len(tokens)) if flat.size else 0
    return positions, deltas


class OrtVlmRunner:
    """Runs the three graphs of :func:`export_vlm` with onnxruntime and generates greedily.

    Position ids: LLaVA / Idefics3 use the running count of the attention mask; Qwen2-VL / Qwen2.5-VL use
    :func:`mrope_position_ids` (a numpy port of the model's ``get_rope_index``, images only) for the
    prompt and ``running text position + rope_delta`` on all three axes for every decode step, as
    transformers' ``generate`` does. ``past`` / ``present`` are lists of (key, value) arrays per layer.
    """

    def __init__(self, out_dir: str | os.PathLike, providers: list[str] | None = None,
                 session_options: Any = None, onnx_dir: str | os.PathLike | None = None) -> None:
        """Open ``out_dir/onnx/*.onnx`` (``onnx_dir`` overrides that folder) and read ``out_dir/config.json``."""
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - depends on the environment
            from skipit.errors import BackendUnavailableError

            raise BackendUnavailableError("onnxruntime is not installed: pip install 'skipit[onnx]'") from exc
        self.out_dir = Path(out_dir)
        onnx_dir = Path(onnx_dir) if onnx_dir is not None else self.out_dir / ONNX_SUBDIR
        missing = [n for n in GRAPH_FILES if not (onnx_dir / n).is_file()]
        config_path = self.out_dir / "config.json"
        if missing or not config_path.is_file():
            raise ExportError(f"{self.out_dir} is not a split VLM export (missing {missing or ['config.json']}); "
                              "run export_vlm first")
        opts = dict(sess_options=session_options, providers=providers or ["CPUExecutionProvider"])
        self.vision = ort.InferenceSession(str(onnx_dir / VISION_FILE), **opts)
        self.embed_session = ort.InferenceSession(str(onnx_dir / EMBED_FILE), **opts)
        self.decoder = ort.InferenceSession(str(onnx_dir / DECODER_FILE), **opts)

        self.config = json.loads(config_path.read_text())
        self.architecture = (self.config.get("architectures") or [""])[0]
        self.image_token_id = next((self.config[k] for k in _IMAGE_TOKEN_KEYS if isinstance(self.config.get(k), int)),
                                   None)
        if self.image_token_id is None:
            raise ExportError(f"{config_path} names no image token ({' / '.join(_IMAGE_TOKEN_KEYS)})")
        self.video_token_id = self.config.get("video_token_id")
        self.spatial_merge_size = int((self.config.get("vision_config") or {}).get("spatial_merge_size") or 1)

        self._vision_types = {i.name: _NP_DTYPES.get(i.type, "float32") for i in self.vision.get_inputs()}
        dec_inputs = {i.name: i for i in self.decoder.get_inputs()}
        layers = sorted({int(m.group(1)) for n in dec_inputs if (m := KV_NAME_RE.fullmatch(n))})
        if layers != list(range(len(layers))) or "inputs_embeds" not in dec_inputs:
            raise ExportError(f"{DECODER_FILE} is not a merged decoder graph taking inputs_embeds")
        self.num_layers = len(layers)
        self.mrope = len(dec_inputs["position_ids"].shape) == 3
        kv = dec_inputs.get("past_key_values.0.key")
        self.kv_heads, self.head_dim = (kv.shape[1], kv.shape[3]) if kv is not None else (0, 0)
        self.float_type = _NP_DTYPES.get(dec_inputs["inputs_embeds"].type, "float32")
        self._present = kv_output_names(self.num_layers)

    # -- the three graphs ----------------------------------------------------------------------------
    def embed(self, input_ids: "np.ndarray") -> "np.ndarray":
        """Token embeddings [batch, seq, hidden]."""
        import numpy as np

        return self.embed_session.run(["inputs_embeds"], {"input_ids": np.asarray(input_ids, dtype=np.int64)})[0]

    def image_features(self, pixel_inputs: Mapping[str, Any]) -> "np.ndarray":
        """Vision encoder: the processor's pixel inputs (extra keys ignored) → [n_image_tokens, hidden]."""
        import numpy as np

        missing = [n for n in self._vision_types if n not in pixel_inputs]
        if missing:
            raise InvalidOptionError(f"{self.architecture} needs pixel inputs {missing} (from its processor)")
        feed = {n: np.asarray(_numpy(pixel_inputs[n]), dtype=t) for n, t in self._vision_types.items()}
        self._check_vision_shapes(feed)
        return self.vision.run(["image_features"], feed)[0]

    def _check_vision_shapes(self, feed: Mapping[str, "np.ndarray"]) -> None:
        """Refuse inputs whose rank or fixed dimensions differ from the graph's, naming them."""
        for value in self.vision.get_inputs():
            got, want = feed[value.name].shape, value.shape
            if len(got) != len(want) or any(isinstance(w, int) and w != g for g, w in zip(got, want)):
                shown = ", ".join(str(d) for d in want)
                raise ExportMismatchError(
                    f"{VISION_FILE} takes {value.name} of shape [{shown}] (the numbers are fixed in the graph: the "
                    f"model's image size); got {list(got)}. This export cannot serve that input: use the processor "
                    f"saved with the export, or export again from a checkpoint whose processor makes such inputs")

    def decode_step(self, inputs_embeds: "np.ndarray", attention_mask: "np.ndarray", position_ids: "np.ndarray",
                    past: Sequence[tuple["np.ndarray", "np.ndarray"]] | None = None
                    ) -> tuple["np.ndarray", list[tuple["np.ndarray", "np.ndarray"]]]:
        """One decoder call: logits [batch, seq, vocab] and the present cache (past + these tokens)."""
        import numpy as np

        batch = inputs_embeds.shape[0]
        if past is None:
            shape = (batch, self.kv_heads, 0, self.head_dim)
            past = [(np.zeros(shape, self.float_type), np.zeros(shape, self.float_type))] * self.num_layers
        if len(past) != self.num_layers:
            raise InvalidOptionError(f"past has {len(past)} layers, the decoder graph {self.num_layers}")
        feed = {
            "inputs_embeds": np.asarray(inputs_embeds, dtype=self.float_type),
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
            "position_ids": np.asarray(position_ids, dtype=np.int64),
        }
        for i, (k, v) in enumerate(past):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k, v
        out = self.decoder.run(["logits", *self._present], feed)
        return out[0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.num_layers)]

    # -- composition ---------------------------------------------------------------------------------
    def prompt_embeddings(self, input_ids: "np.ndarray", pixel_inputs: Mapping[str, Any] | None) -> "np.ndarray":
        """Token embeddings with the image features written into the image-token positions (row-major
        order, like ``masked_scatter``)."""
        import numpy as np

        ids = np.asarray(input_ids, dtype=np.int64)
        embeds = self.embed(ids)
        slots = ids == self.image_token_id
        if not slots.any():
            return embeds
        if not pixel_inputs:
            raise InvalidOptionError(f"the prompt has {int(slots.sum())} image tokens but no pixel inputs were given")
        features = self.image_features(pixel_inputs)
        if features.shape[0] != int(slots.sum()):
            raise InvalidOptionError(
                f"image features and image tokens do not match: {features.shape[0]} feature rows for "
                f"{int(slots.sum())} image tokens in the prompt")
        embeds[slots] = features.astype(embeds.dtype)
        return embeds

    def prompt_positions(self, input_ids: "np.ndarray", attention_mask: "np.ndarray",
                         pixel_inputs: Mapping[str, Any] | None) -> tuple["np.ndarray", "np.ndarray"]:
        """(prompt position ids, per-row delta added to the running position at decode steps)."""
        import numpy as np

        batch = attention_mask.shape[0]
        if not self.mrope:
            return position_ids_from_mask(attention_mask, attention_mask.shape[1]), np.zeros((batch, 1), np.int64)
        grid = _numpy(pixel_inputs["image_grid_thw"]) if pixel_inputs and "image_grid_thw" in pixel_inputs else None
        return mrope_position_ids(input_ids, grid, self.image_token_id, self.spatial_merge_size,
                                  attention_mask, self.video_token_id)

    def decode_positions(self, attention_mask: "np.ndarray", rope_delta: "np.ndarray", seq_len: int = 1) -> "np.ndarray":
        """Position ids of the last ``seq_len`` (new) tokens per row, given the mask including them (and, for
        multimodal RoPE, the prompt's ``rope_delta`` from :meth:`prefill`; 0 for text)."""
        import numpy as np

        pos = position_ids_from_mask(np.asarray(attention_mask, dtype=np.int64), seq_len)
        return np.broadcast_to(pos + rope_delta, (3, *pos.shape)).copy() if self.mrope else pos

    def forward(self, input_ids: "np.ndarray", attention_mask: "np.ndarray | None" = None,
                past: Sequence[tuple["np.ndarray", "np.ndarray"]] | None = None
                ) -> tuple["np.ndarray", list[tuple["np.ndarray", "np.ndarray"]]]:
        """Text tokens only, with :meth:`OrtDecoderRunner.forward`'s interface (prefill with ``past=None``,
        cached steps after): embeddings, then one decoder call; the mask covers past + new tokens."""
        import numpy as np

        ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = ids.shape
        past_len = past[0][0].shape[2] if past else 0
        mask = (np.ones((batch, past_len + seq), np.int64) if attention_mask is None
                else np.asarray(attention_mask, dtype=np.int64))
        positions = self.decode_positions(mask, np.zeros((batch, 1), np.int64), seq)
        return self.decode_step(self.embed(ids), mask, positions, past)

    def prefill(self, input_ids: "np.ndarray", pixel_inputs: Mapping[str, Any] | None = None,
                attention_mask: "np.ndarray | None" = None
                ) -> tuple["np.ndarray", list[tuple["np.ndarray", "np.ndarray"]], "np.ndarray"]:
        """Run the prompt: (logits [batch, seq, vocab], present cache, rope delta [batch, 1])."""
        import numpy as np

        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        embeds = self.prompt_embeddings(ids, pixel_inputs)
        positions, delta = self.prompt_positions(ids, mask, pixel_inputs)
        logits, present = self.decode_step(embeds, mask, positions)
        return logits, present, delta

    def generate_greedy(self, input_ids: "np.ndarray", pixel_inputs: Mapping[str, Any] | None,
                        max_new_tokens: int, attention_mask: "np.ndarray | None" = None,
                        eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None
                        ) -> "np.ndarray":
        """Greedy decoding like transformers' ``generate(do_sample=False)``: prompt + new tokens.

        ``pixel_inputs`` is what the processor returned for the images (``pixel_values`` and, per
        architecture, ``pixel_attention_mask`` or ``image_grid_thw``; other keys are ignored). With
        ``eos_token_id``, finished rows continue with ``pad_token_id`` and decoding stops once all finished.
        """
        import numpy as np

        if max_new_tokens < 0:
            raise InvalidOptionError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
        tokens = np.asarray(input_ids, dtype=np.int64)
        batch = tokens.shape[0]
        mask = np.ones_like(tokens) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        done = np.zeros(batch, dtype=bool)
        if max_new_tokens == 0:
            return tokens
        logits, past, delta = self.prefill(tokens, pixel_inputs, mask)
        for step in range(max_new_tokens):
            nxt = np.where(done, pad, logits[:, -1, :].argmax(-1)).astype(np.int64)
            tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
            if eos:
                done |= np.isin(nxt, eos)
                if done.all():
                    break
            if step == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            logits, past = self.decode_step(self.embed(nxt[:, None]), mask, self.decode_positions(mask, delta), past)
        return tokens


def _numpy(value: Any) -> "np.ndarray":
    """torch tensors (from a processor with return_tensors='pt') and lists alike."""
    import numpy as np

    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


__all__ = [
    "DECODER_FILE", "EMBED_FILE", "PROCESSOR_CHECKS", "VISION_FILE", "OrtVlmRunner", "export_vlm",
    "find_split_export", "mrope_position_ids", "supported_vlm_architectures",
]
