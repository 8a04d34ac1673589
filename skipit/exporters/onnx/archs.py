"""What exporting each architecture needs, as data: one :class:`OnnxConfig` record per architecture.

The records are shaped like optimum's ``OnnxConfig`` (inputs with their dynamic axes, dummy-input
generators, the model patches a trace needs, the routes known to work) and keyed by the class names of the
one architecture registry, :data:`skipit.compressor.arch.REGISTRY`: a name here must be registered there
(:func:`onnx_config` refuses one that is not, and tests/test_onnx_vlm.py checks that every registered VLM has
a record). Text decoders need nothing of their own: every text architecture exports with
:data:`TEXT_DECODER`. The compressor knows nothing of export, so the export facts live beside the
registry here rather than in ``ArchSpec``.

Notable entries (the why is kept with the data):

* LLaVA: ``get_image_features`` ends with ``list(image_features)`` over the image batch, which makes
  torch.export specialise the number of images. A forward hook packs the projector output into one row
  ([1, images × tokens, hidden]) for the trace, so the model's own code runs unchanged and the image count
  stays dynamic.
* Qwen2-VL / Qwen2.5-VL: the vision tower derives its rotary positions, attention segments and (2.5-VL)
  window order from ``image_grid_thw`` with ``.tolist()`` loops; the wrapper computes them in-graph
  (:mod:`skipit.exporters.onnx.qwen_vision`) and calls the tower directly. The decoder takes 3-D
  multimodal-RoPE ``position_ids``.
* Idefics3 (SmolVLM): ``get_image_features`` splits its output per batch row with ``.tolist()``; the batch
  axis is folded into the image axis. The legacy exporter fails on its vision part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from skipit.errors import UnsupportedArchitectureError
from skipit.exporters.onnx.convention import BATCH, NUM_IMAGES, NUM_PATCHES

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from skipit.exporters.onnx.config import OnnxExportConfig

Examples = tuple[dict[str, "torch.Tensor"], list[dict[str, "torch.Tensor"]]]
_ALL = ("dynamo", "legacy")


@dataclass(frozen=True)
class OnnxConfig:
    """How to export one architecture (see the module docstring).

    Attributes:
        vision_inputs: the vision graph's inputs in order (what the processor returns) → their dynamic axes;
            empty for a text decoder (one graph, ``model.onnx``).
        dummy_vision_inputs: builds (trace inputs, verification inputs) for the vision graph from the model.
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
            ``get_image_features`` ([batch, images, …] → [1, batch × images, …]).
        qwen_grid: compute the vision tower's grid-derived helper tensors inside the graph and run its
            attention with a block-diagonal mask (:mod:`skipit.exporters.onnx.qwen_vision`).
        mrope: the decoder takes 3-D ``position_ids`` [3, batch, seq] (multimodal RoPE).
        processor_options: processor call options the export is verified with, each on every image set of
            ``PROCESSOR_CHECKS`` (options that change what reaches the vision graph, e.g. the number of crops).
        why: what was measured, for the routes left out.
    """

    vision_inputs: Mapping[str, Mapping[int, str]] = field(default_factory=dict)
    dummy_vision_inputs: Callable[[Any], Examples] | None = None
    routes: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: {"decoder": _ALL})
    pack_module: str | None = None
    tower: str | None = None
    fold_batch: bool = False
    qwen_grid: bool = False
    mrope: bool = False
    processor_options: tuple[Mapping[str, Any], ...] = ({},)
    why: str = ""

    @property
    def is_vlm(self) -> bool:
        return bool(self.vision_inputs)

    def vision_examples(self, model: Any) -> Examples:
        """``dummy_vision_inputs(model)``: (trace inputs, verification inputs) of the vision graph."""
        if self.dummy_vision_inputs is None:
            raise UnsupportedArchitectureError(
                "this architecture's ONNX record has vision_inputs but no dummy_vision_inputs; add one to its record")
        return self.dummy_vision_inputs(model)

    def routes_for(self, architecture: str, graph: str, config: "OnnxExportConfig") -> list[str]:
        """Exporters to try for one graph: the requested one where the record offers it, else the record's."""
        import logging

        known = list(self.routes[graph])
        if config.exporter == "auto" or config.exporter in known:
            return known if config.exporter == "auto" else [config.exporter]
        logging.getLogger(__name__).warning(
            "%s: the %s exporter does not work for its %s graph (%s); using %s for that graph",
            architecture, config.exporter, graph, self.why, known[0])
        return known


def _square_size(model: Any) -> int:
    return int(model.config.vision_config.image_size)


def _llava_examples(model: Any) -> Examples:
    import torch

    s = _square_size(model)
    gen = torch.Generator().manual_seed(0)
    make = lambda n: {"pixel_values": torch.randn(n, 3, s, s, generator=gen)}  # noqa: E731
    return make(2), [make(1), make(3)]


def _idefics3_examples(model: Any) -> Examples:
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


def _qwen_examples(model: Any) -> Examples:
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


#: Every text decoder: one merged graph, both exporters work.
TEXT_DECODER = OnnxConfig()

# Qwen2-VL and Qwen2.5-VL share the vision interface: flattened patches + a [t, h, w] grid per image.
_QWEN_VL = OnnxConfig(
    vision_inputs={"pixel_values": {0: NUM_PATCHES}, "image_grid_thw": {0: NUM_IMAGES}},
    dummy_vision_inputs=_qwen_examples,
    routes={"vision": _ALL, "embed": _ALL, "decoder": _ALL},
    tower="model.visual",
    qwen_grid=True,
    mrope=True,
)

#: Export records of the architectures whose export needs more than :data:`TEXT_DECODER`, by registry name.
ONNX_CONFIGS: dict[str, OnnxConfig] = {
    # get_image_features ends with list(features) over the image batch: pack the projector output instead.
    "LlavaForConditionalGeneration": OnnxConfig(
        vision_inputs={"pixel_values": {0: NUM_IMAGES}},
        dummy_vision_inputs=_llava_examples,
        routes={"vision": _ALL, "embed": _ALL, "decoder": _ALL},
        pack_module="model.multi_modal_projector",
    ),
    # The vision tower is called directly with grid helpers computed in-graph (get_image_features would split
    # per image with .tolist()); with those helpers even the legacy tracer keeps the image grid dynamic.
    "Qwen2VLForConditionalGeneration": _QWEN_VL,
    "Qwen2_5_VLForConditionalGeneration": _QWEN_VL,  # same vision interface as Qwen2-VL
    # get_image_features splits its output per batch row with .tolist(): the batch is folded into the images.
    "Idefics3ForConditionalGeneration": OnnxConfig(
        vision_inputs={"pixel_values": {0: BATCH, 1: NUM_IMAGES}, "pixel_attention_mask": {0: BATCH, 1: NUM_IMAGES}},
        dummy_vision_inputs=_idefics3_examples,
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
    """VLM classes :func:`~skipit.exporters.onnx.export_vlm` knows how to split."""
    return sorted(ONNX_CONFIGS)


def onnx_config(architecture: str | None) -> OnnxConfig:
    """The export record of ``architecture``: its own, :data:`TEXT_DECODER` for a text decoder."""
    from skipit.compressor.arch import REGISTRY

    spec = REGISTRY.get(architecture or "")
    if architecture in ONNX_CONFIGS:
        if spec is None:
            raise UnsupportedArchitectureError(
                f"{architecture} has an ONNX record but no ArchSpec; register it in skipit.compressor.arch first")
        return ONNX_CONFIGS[architecture]
    if spec is not None and spec.is_vlm:
        raise UnsupportedArchitectureError(
            f"{architecture!r} has no split-graph ONNX export; supported VLMs: {', '.join(supported_vlm_architectures())}. "
            "Add an OnnxConfig to skipit.exporters.onnx.archs.ONNX_CONFIGS")
    return TEXT_DECODER
