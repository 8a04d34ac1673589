"""Split-graph ONNX export of a vision-language model (the layout SmolVLM and transformers.js ship).

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
``vision_encoder.onnx``: the pixel inputs the model's processor produces, per architecture (the
``vision_inputs`` of its :class:`~skipit.exporters.onnx.archs.OnnxConfig`) → ``image_features``
[n_image_tokens, hidden]: exactly the rows the model scatters into the image-token positions, in order (all
images of the batch, concatenated).

``embed_tokens.onnx``: ``input_ids`` [batch_size, sequence_length] → ``inputs_embeds`` [batch_size,
sequence_length, hidden].

``decoder_model_merged.onnx``: the text decoder's graph (:mod:`skipit.exporters.onnx.convention`) taking
``inputs_embeds``; a checkpoint with removed layers exports with fewer KV inputs. ``position_ids`` is
[batch_size, sequence_length], except for Qwen2-VL / Qwen2.5-VL: [3, batch_size, sequence_length], the
multimodal RoPE positions (temporal, height, width) computed *outside* the graph.

To run them: embed the prompt, run the vision encoder, write its rows into the image-token positions of the
embeddings, prefill the decoder, then decode with the cache — :class:`skipit.runtime.ort_vlm.OrtVlmRunner`.
Each graph is traced separately (:mod:`skipit.exporters.onnx.trace`), with what each architecture needs read
from its record (:mod:`skipit.exporters.onnx.archs`), and verified (:mod:`skipit.exporters.onnx.verify`).
Fixed dimensions stay fixed only where the model or its processor fixes them (LLaVA's and Idefics3's crop
size): the runner refuses other shapes with a message naming the input.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from skipit.compat import TRANSFORMERS_MAJOR
from skipit.compressor.arch import resolve
from skipit.errors import ExportError, UnsupportedArchitectureError
from skipit.exporters.onnx.archs import OnnxConfig, supported_vlm_architectures
from skipit.exporters.onnx.config import OnnxExportConfig
from skipit.exporters.onnx.convention import BATCH, DECODER_FILE, EMBED_FILE, GRAPH_FILES, IMAGE_TOKENS, SEQ
from skipit.exporters.onnx.convention import VISION_FILE, decoder_io
from skipit.exporters.onnx.model import KvGeometry, decoder_example, decoder_wrapper, export_record, kv_geometry
from skipit.exporters.onnx.model import load_for_export
from skipit.exporters.onnx.package import copy_side_files, export_graphs, refuse_existing
from skipit.exporters.onnx.qwen_vision import qwen_grid_kwargs, segment_attention_forward
from skipit.exporters.onnx.text import EXAMPLE_BATCH, EXAMPLE_PAST, EXAMPLE_SEQ
from skipit.exporters.onnx.trace import Graph

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _trace_patches(model: Any, record: OnnxConfig) -> Iterator[None]:
    """Reversible changes the vision trace needs (see :mod:`skipit.exporters.onnx.archs`)."""
    handles = []
    patched: list[tuple[type, Any]] = []
    try:
        if record.pack_module:
            def pack(_module: Any, _inputs: Any, output: "torch.Tensor") -> "torch.Tensor":
                return output.reshape(1, -1, output.shape[-1])

            handles.append(resolve(model, record.pack_module).register_forward_hook(pack))
        if record.qwen_grid:
            cls = type(resolve(model, record.tower or "model.visual").blocks[0].attn)  # the vision attention class
            patched.append((cls, cls.forward))
            cls.forward = segment_attention_forward
        yield
    finally:
        for handle in handles:
            handle.remove()
        for cls, original in patched:
            cls.forward = original


def _vision_wrapper(model: Any, record: OnnxConfig) -> "torch.nn.Module":
    """pixel inputs → image_features [n_image_tokens, hidden] through the model's ``get_image_features``
    (or its vision tower, see ``OnnxConfig.tower``)."""
    import torch

    vision_cfg = model.config.vision_config
    merge = int(getattr(vision_cfg, "spatial_merge_size", 1) or 1)
    window = getattr(vision_cfg, "window_size", None)
    window_merged = int(window) // merge // int(vision_cfg.patch_size) if window else None
    names = list(record.vision_inputs)
    second = names[1] if len(names) > 1 else None

    class VisionEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
            kwargs: dict[str, Any] = {}
            if record.tower:
                tower = resolve(self.model, record.tower)
                if record.qwen_grid:
                    if aux is None:
                        raise ExportError(f"{record.tower} needs its grid input ({names[1:]}) beside pixel_values")
                    kwargs = qwen_grid_kwargs(aux, pixel_values.shape[0], merge, window_merged)
                out = tower(pixel_values.to(tower.dtype), grid_thw=aux, return_dict=True, **kwargs)
            else:
                if record.fold_batch:
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


def _graphs(model: Any, arch: str, record: OnnxConfig, geo: KvGeometry, dtype: "torch.dtype",
            config: OnnxExportConfig) -> list[Graph]:
    import torch

    trace_vision, _ = record.vision_examples(model)
    vision_args = tuple(_cast(trace_vision[n], dtype) for n in record.vision_inputs)
    vision_axes = {**{k: dict(v) for k, v in record.vision_inputs.items()}, "image_features": {0: IMAGE_TOKENS}}
    ids = torch.randint(0, geo.vocab_size, (EXAMPLE_BATCH, EXAMPLE_SEQ), generator=torch.Generator().manual_seed(0))
    decoder_inputs, decoder_outputs, decoder_axes = decoder_io(geo.num_layers, "inputs_embeds", record.mrope)
    return [
        Graph("vision", VISION_FILE, _vision_wrapper(model, record), vision_args, list(record.vision_inputs),
              ["image_features"], vision_axes, routes=record.routes_for(arch, "vision", config),
              patches=lambda: _trace_patches(model, record)),
        Graph("embed", EMBED_FILE, _embed_wrapper(model), (ids,), ["input_ids"], ["inputs_embeds"],
              {"input_ids": {0: BATCH, 1: SEQ}, "inputs_embeds": {0: BATCH, 1: SEQ}},
              routes=record.routes_for(arch, "embed", config)),
        Graph("decoder", DECODER_FILE, decoder_wrapper(model, "inputs_embeds"),
              decoder_example(geo, dtype, EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST, embeds=True, mrope=record.mrope),
              decoder_inputs, decoder_outputs, decoder_axes, routes=record.routes_for(arch, "decoder", config)),
    ]


def _cast(tensor: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor":
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


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
            routes the architecture's record lists; an explicit exporter is used for every graph it works for,
            the others use their listed route (a warning says so). Each graph records its exporter in the ONNX
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

    from skipit.exporters.onnx.verify import verify_vlm

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if TRANSFORMERS_MAJOR < 5:
        import transformers

        # The vision graphs call 5.x interfaces: get_image_features(return_dict=True).pooler_output, and
        # Qwen2-VL vision towers that take their grid helper tensors precomputed (see qwen_vision).
        raise ExportError(f"VLM split-graph export needs transformers 5.x (this is {transformers.__version__}); "
                          "text decoders export on 4.57 too")
    targets = refuse_existing(out_dir, GRAPH_FILES, config)
    started = time.perf_counter()
    arch, record = export_record(model_dir)
    if not record.is_vlm or arch is None:
        raise UnsupportedArchitectureError(
            f"{arch!r} has no split-graph ONNX export; supported VLMs: {', '.join(supported_vlm_architectures())}. "
            f"Text decoders export with skipit.exporters.onnx.export_text_decoder")
    model, _, record = load_for_export(model_dir, config)
    geo = kv_geometry(model)
    dtype = torch.float16 if config.dtype == "fp16" else torch.float32
    traced = copy.deepcopy(model).to(dtype) if config.dtype == "fp16" else model
    graphs = _graphs(traced, arch, record, geo, dtype, config)
    log.info("exporting %s (%s, %d decoder layers) to split ONNX graphs, opset %d, %s",
             model_dir, arch, geo.num_layers, config.opset, config.dtype)
    export_graphs(out_dir, graphs, config,
                  metadata={"skipit.architecture": arch, "skipit.num_hidden_layers": str(geo.num_layers),
                            "skipit.dtype": config.dtype},
                  side_files=lambda staged: copy_side_files(model_dir, staged, processor=True),
                  verify=lambda onnx_dir: verify_vlm(model, model_dir, arch, record, geo, onnx_dir, config))
    log.info("split ONNX export of %s done in %.1f s: %s", model_dir.name, time.perf_counter() - started,
             out_dir / "onnx")
    return targets
