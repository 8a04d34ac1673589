"""The model side of an export: loading a checkpoint for tracing, and the KV-cache plumbing of the decoder.

The decoder graph (text and VLM alike) is traced through one wrapper with an explicit signature: it builds a
transformers ``DynamicCache`` from the flat past tensors, calls the model with ``cache=`` (transformers
≥ 5.24; ``past_key_values=`` before, :func:`skipit.compat.cache_kwarg`) and flattens the returned cache.
Every layer gets a plain full-length cache layer, *also* the sliding-window ones: the sliding window is
applied by the attention mask, which transformers builds from absolute positions, so the graph is exact for
any length (sliding layers keep their whole past, as in optimum's exports). Models are loaded with
``attn_implementation="eager"``: at opset 18 attention is MatMul/Softmax either way, and eager's finite mask
value keeps fully padded rows free of NaN (SDPA's -inf does not) and keeps Gemma-2's logit soft-capping.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from skipit.compat import cache_kwarg, load_overrides
from skipit.errors import ExportError, ModelLoadError
from skipit.exporters.onnx.archs import OnnxConfig, onnx_config
from skipit.exporters.onnx.config import OnnxExportConfig
from skipit.exporters.onnx.convention import position_ids_from_mask

if TYPE_CHECKING:  # pragma: no cover
    import torch

# Layer types whose KV cache is a plain [batch, kv_heads, past, head_dim] pair per layer.
_KV_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})


def read_config(model_dir: Path) -> dict[str, Any]:
    """``model_dir/config.json``; :class:`ModelLoadError` when there is none."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json: pass a Hugging Face checkpoint directory")
    return json.loads(path.read_text())


def export_record(model_dir: Path) -> tuple[str | None, OnnxConfig]:
    """(architecture named by ``model_dir/config.json``, its export record)."""
    arch = (read_config(model_dir).get("architectures") or [None])[0]
    return arch, onnx_config(arch)


def load_for_export(model_dir: Path, config: OnnxExportConfig) -> tuple[Any, str | None, OnnxConfig]:
    """(the fp32 model in ``model_dir`` loaded for tracing, its architecture name, its export record).

    A VLM is loaded as its own class, a text decoder as ``AutoModelForCausalLM`` (with the 4.x spelling of a
    5.x config's RoPE settings, :func:`skipit.compat.load_overrides`); attention is
    ``config.attn_implementation``.
    """
    import torch
    import transformers

    arch, record = export_record(model_dir)
    cls = getattr(transformers, arch, None) if record.is_vlm and arch else transformers.AutoModelForCausalLM
    what = arch if record.is_vlm else "a causal LM"
    if cls is None:
        raise ModelLoadError(f"cannot load {model_dir} as {what} for ONNX export: this transformers "
                             f"({transformers.__version__}) has no class {arch}; install a release that has it")
    try:
        model = cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=config.attn_implementation,
                                    **load_overrides(model_dir))
    except (ValueError, OSError, KeyError, AttributeError) as exc:
        raise ModelLoadError(
            f"cannot load {model_dir} as {what} for ONNX export: {exc}. Text decoders (LlamaForCausalLM, "
            f"Qwen2ForCausalLM, …) export as one graph, the VLMs of skipit's registry as split graphs"
        ) from exc
    return model.eval(), arch, record


@dataclass(frozen=True)
class KvGeometry:
    """Shape of a decoder's KV cache: one ``[batch, kv_heads, length, head_dim]`` pair per layer."""

    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    hidden_size: int = 0


def kv_geometry(model: Any) -> KvGeometry:
    """KV-cache shape from the text config; refuse layer types without a plain KV pair."""
    cfg = model.config.get_text_config(decoder=True)
    n = int(cfg.num_hidden_layers)
    layer_types = list(getattr(cfg, "layer_types", None) or [])
    if layer_types and len(layer_types) != n:
        raise ExportError(
            f"config has num_hidden_layers={n} but {len(layer_types)} layer_types; the checkpoint's per-layer "
            f"config was not sliced when layers were removed: rebuild it with skipit's rewrite"
        )
    odd = sorted(set(layer_types) - _KV_LAYER_TYPES)
    if odd:
        raise ExportError(
            f"layer types {odd} have no plain per-layer KV cache; the ONNX exporter supports "
            f"{sorted(_KV_LAYER_TYPES)} only"
        )
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return KvGeometry(n, kv_heads, head_dim, int(cfg.vocab_size), int(cfg.hidden_size))


def build_cache(past: Sequence[tuple["torch.Tensor", "torch.Tensor"]]) -> Any:
    """A DynamicCache holding ``past`` with one full-length layer per decoder layer.

    Full-length layers also for sliding-window layers: the mask (built from absolute positions)
    applies the window, so keeping the whole past is exact. ``get_seq_length`` reads the shape
    directly, without DynamicLayer's ``numel() == 0`` test, which would put a guard on the past
    length into the traced graph.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class _TracedLayer(DynamicLayer):
        def __init__(self, keys: "torch.Tensor", values: "torch.Tensor") -> None:
            super().__init__()
            self.keys, self.values = keys, values
            self.device = keys.device
            self.is_initialized = True

        def get_seq_length(self) -> int:
            return self.keys.shape[-2]  # type: ignore[union-attr]  # set in __init__, never None here

    cache = DynamicCache()
    cache.layers = [_TracedLayer(k, v) for k, v in past]
    cache.layer_class_to_replicate = None  # a layer index beyond the past is a bug, not a new layer
    return cache


def forward_with_past(model: Any, kwarg: str, past_key_values: Sequence[tuple[Any, Any]], **inputs: Any) -> tuple:
    """Run ``model`` on a cache built from flat past tensors; return ``(logits, *present)``.

    The cache is updated in place, so each layer holds past + the new tokens afterwards, flattened as key,
    value per layer.
    """
    cache = build_cache(past_key_values)
    out = model(**inputs, use_cache=True, **{kwarg: cache})
    present: list[Any] = []
    for layer in cache.layers:
        present += [layer.keys, layer.values]
    return (out.logits, *present)


def decoder_wrapper(model: Any, first_input: str = "input_ids") -> "torch.nn.Module":
    """The decoder graph's module: ``first_input`` (``input_ids`` or ``inputs_embeds``) + mask + positions +
    flat past → logits + flat present, through the model's own forward."""
    import torch

    kwarg = cache_kwarg(model)

    class DecoderWithPast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            inputs: torch.Tensor,
            attention_mask: torch.Tensor,
            position_ids: torch.Tensor,
            past_key_values: list[tuple[torch.Tensor, torch.Tensor]],
        ) -> tuple[torch.Tensor, ...]:
            return forward_with_past(self.model, kwarg, past_key_values, attention_mask=attention_mask,
                                     position_ids=position_ids, **{first_input: inputs})

    return DecoderWithPast().eval()


def decoder_example(geo: KvGeometry, dtype: "torch.dtype", batch: int, seq: int, past: int, *,
                    embeds: bool = False, mrope: bool = False, left_pad: int = 0, seed: int = 0) -> tuple:
    """(input_ids or inputs_embeds, attention_mask, position_ids, past), row 0 left-padded by ``left_pad``.

    Positions follow :func:`~skipit.exporters.onnx.convention.position_ids_from_mask`; multimodal-RoPE
    positions differ per axis (as around an image) so every section is exercised.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    if embeds:
        first = torch.randn(batch, seq, geo.hidden_size, generator=gen).to(dtype)
    else:
        first = torch.randint(0, geo.vocab_size, (batch, seq), generator=gen)
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
    return first, mask, positions, kv
