"""Architecture specs: where a model's decoder layers live and what a removal must touch.

Architectures are described as data (one :class:`ArchSpec` per model class name). Everything that
differs between architectures lives here; analyze, certify and rewrite stay generic. A model whose
class is not registered is probed: the ``nn.ModuleList`` whose length equals the text config's
``num_hidden_layers`` is taken as the decoder, provided the model has an LM head.

To support a new architecture, add an entry to :data:`REGISTRY` (or call :func:`register`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from skipit.errors import InvalidOptionError, UnsupportedArchitectureError

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

# Candidate module paths. They have moved between transformers releases (e.g. LLaVA's language model
# went from ``language_model.model.layers`` to ``model.language_model.layers`` in 4.52), so each spec
# keeps several; the first that resolves wins.
_CAUSAL_LM_LAYERS = ("model.layers",)
_CAUSAL_LM_NORM = ("model.norm",)
_VLM_LAYERS = ("model.language_model.layers", "language_model.model.layers", "model.layers")
_VLM_NORM = ("model.language_model.norm", "language_model.model.norm", "model.norm")


@dataclass(frozen=True)
class ArchSpec:
    """What skipit needs to know about one model class. Plain data; see :data:`REGISTRY`.

    Attributes:
        name: the model class name (``config.architectures[0]``).
        layer_paths: candidate dotted paths of the decoder ``nn.ModuleList``.
        norm_paths: candidate dotted paths of the final norm applied before the LM head.
        per_layer_lists: text-config keys holding one entry per layer; sliced to the kept layers.
        layer_index_keys: text-config ints that count layers from the bottom (e.g. Qwen2's
            ``max_window_layers``); remapped to the number of kept layers below them.
        mirror_top_level: also update top-level config copies of the layer count / per-layer lists.
        logit_softcap_key: config key of a final logit soft-cap that the LM head output goes through.
        is_vlm: the model takes images; only the language decoder's layers are candidates.
        image_token_keys: config keys naming the image placeholder token id (VLMs).
        image_prompt: how to place one image in a prompt when the processor has no chat template.
        why: a comment on the quirks, kept with the data.
    """

    name: str
    layer_paths: tuple[str, ...] = _CAUSAL_LM_LAYERS
    norm_paths: tuple[str, ...] = _CAUSAL_LM_NORM
    per_layer_lists: tuple[str, ...] = ("layer_types",)
    layer_index_keys: tuple[str, ...] = ()
    mirror_top_level: bool = False
    logit_softcap_key: str | None = None
    is_vlm: bool = False
    image_token_keys: tuple[str, ...] = ("image_token_id", "image_token_index")
    image_prompt: str = "<image>\n{text}"
    why: str = ""


def _vlm(name: str, **kw: Any) -> ArchSpec:
    kw = {"layer_paths": _VLM_LAYERS, "norm_paths": _VLM_NORM, **kw}
    return ArchSpec(name=name, is_vlm=True, **kw)


REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    """Add (or replace) a spec in the registry and return it."""
    REGISTRY[spec.name] = spec
    return spec


for _spec in (
    ArchSpec("LlamaForCausalLM", why="reference layout; SmolLM2 is a Llama"),
    ArchSpec("MistralForCausalLM"),
    ArchSpec(
        "Qwen2ForCausalLM",
        layer_index_keys=("max_window_layers",),
        why="layer_types marks sliding layers and must be sliced, not regenerated from "
        "max_window_layers (that would mislabel them); max_window_layers is kept consistent",
    ),
    ArchSpec("Qwen3ForCausalLM", layer_index_keys=("max_window_layers",), why="as Qwen2"),
    ArchSpec(
        "Gemma2ForCausalLM",
        logit_softcap_key="final_logit_softcapping",
        why="alternating sliding/full layer_types; logits are soft-capped after the LM head",
    ),
    ArchSpec(
        "Gemma3ForCausalLM",
        logit_softcap_key="final_logit_softcapping",
        why="layer_types pattern (5 sliding : 1 full) selects rope and mask per layer by index",
    ),
    _vlm("LlavaForConditionalGeneration", why="text decoder is a Llama under model.language_model"),
    _vlm(
        "Qwen2VLForConditionalGeneration",
        layer_index_keys=("max_window_layers",),
        mirror_top_level=True,
        image_prompt="<|vision_start|><|image_pad|><|vision_end|>{text}",
        why="4.57 hub configs are flat and keep a top-level num_hidden_layers/layer_types next to "
        "text_config's; other tools read the top-level copy, so both are updated",
    ),
    _vlm(
        "Qwen2_5_VLForConditionalGeneration",
        layer_index_keys=("max_window_layers",),
        mirror_top_level=True,
        image_prompt="<|vision_start|><|image_pad|><|vision_end|>{text}",
        why="as Qwen2-VL",
    ),
    _vlm(
        "Idefics3ForConditionalGeneration",
        layer_paths=("model.text_model.layers",),
        norm_paths=("model.text_model.norm",),
        image_prompt="<image>{text}",
        why="SmolVLM: the text decoder is a Llama under model.text_model",
    ),
):
    register(_spec)


def supported_architectures() -> list[str]:
    """Names of the registered model classes."""
    return sorted(REGISTRY)


def resolve(root: Any, path: str) -> Any:
    """The attribute at dotted ``path`` below ``root`` (``model.language_model.layers``); AttributeError if absent."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _first(root: Any, paths: Sequence[str]) -> tuple[str, Any] | None:
    for path in paths:
        try:
            return path, resolve(root, path)
        except AttributeError:
            continue
    return None


def _unsupported(name: str, why: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"architecture {name!r} is not supported: {why}. Supported: {', '.join(supported_architectures())}. "
        "To add one, register an ArchSpec in skipit.compressor.arch (layer path, final norm path, "
        "per-layer config lists) — see the REGISTRY entries there for examples."
    )


@dataclass
class DecoderSpec:
    """An :class:`ArchSpec` bound to one loaded model: the live modules and configs.

    ``original_indices`` maps the current layer positions to the model's original numbering, so
    indices reported to users never shift after a removal.
    """

    arch: ArchSpec
    model: Any
    layers_path: str
    norm_path: str
    original_indices: list[int] = field(default_factory=list)

    @property
    def layers(self) -> "torch.nn.ModuleList":
        return resolve(self.model, self.layers_path)

    @property
    def norm(self) -> "torch.nn.Module":
        return resolve(self.model, self.norm_path)

    @property
    def lm_head(self) -> "torch.nn.Module":
        return self.model.get_output_embeddings()

    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config(decoder=True)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def is_vlm(self) -> bool:
        return self.arch.is_vlm

    @property
    def logit_softcap(self) -> float | None:
        key = self.arch.logit_softcap_key
        return getattr(self.text_config, key, None) if key else None

    @property
    def image_token_id(self) -> int | None:
        for key in self.arch.image_token_keys:
            for cfg in (self.model.config, self.text_config):
                value = getattr(cfg, key, None)
                if isinstance(value, int):
                    return value
        return None

    def _configs(self) -> list[Any]:
        configs = [self.text_config]
        top = self.model.config
        if self.arch.mirror_top_level and top is not configs[0]:
            configs.append(top)
        return configs

    def keep_layers_(self, keep: Sequence[int]) -> dict[str, Any]:
        """Keep only the layers at current positions ``keep`` (in place); return an undo record.

        Updates, as one operation: the ModuleList, ``num_hidden_layers``, every per-layer config
        list, layer-count keys, and each kept layer's ``layer_idx`` (the KV cache indexes layers by
        it: stale values fail with IndexError at the first cached forward).
        """
        import torch

        n = self.num_layers
        keep = sorted(set(keep))
        if not keep or keep[0] < 0 or keep[-1] >= n:
            raise InvalidOptionError(f"layers to keep {keep} are out of range for {n} layers")
        old_layers = self.layers
        undo: dict[str, Any] = {"layers": old_layers, "indices": list(self.original_indices), "config": []}
        parent_path, _, attr = self.layers_path.rpartition(".")
        setattr(resolve(self.model, parent_path), attr, torch.nn.ModuleList([old_layers[i] for i in keep]))
        for cfg in self._configs():
            saved = {}
            for key in ("num_hidden_layers", *self.arch.per_layer_lists, *self.arch.layer_index_keys):
                if key not in cfg.__dict__:
                    continue
                value = getattr(cfg, key)
                saved[key] = value
                if key == "num_hidden_layers":
                    setattr(cfg, key, len(keep))
                elif key in self.arch.per_layer_lists and isinstance(value, (list, tuple)):
                    if len(value) != n:
                        raise UnsupportedArchitectureError(
                            f"config.{key} has {len(value)} entries but the model has {n} layers; "
                            "the checkpoint is inconsistent — fix its config.json"
                        )
                    setattr(cfg, key, type(value)(value[i] for i in keep))
                elif key in self.arch.layer_index_keys and isinstance(value, int):
                    setattr(cfg, key, sum(1 for i in keep if i < value))
            undo["config"].append((cfg, saved))
        undo["layer_idx"] = _renumber(self.layers)
        self.original_indices = [self.original_indices[i] for i in keep]
        return undo

    def restore_(self, undo: dict[str, Any]) -> None:
        """Undo :meth:`keep_layers_`."""
        for module, value in undo["layer_idx"]:
            module.layer_idx = value
        parent_path, _, attr = self.layers_path.rpartition(".")
        setattr(resolve(self.model, parent_path), attr, undo["layers"])
        for cfg, saved in undo["config"]:
            for key, value in saved.items():
                setattr(cfg, key, value)
        self.original_indices = undo["indices"]

    @contextlib.contextmanager
    def skipping(self, removed_original: Sequence[int]) -> Iterator["DecoderSpec"]:
        """Temporarily remove layers (given in original numbering), restoring them on exit."""
        removed = set(removed_original)
        keep = [pos for pos, orig in enumerate(self.original_indices) if orig not in removed]
        undo = self.keep_layers_(keep)
        try:
            yield self
        finally:
            self.restore_(undo)


def _renumber(layers: "torch.nn.ModuleList") -> list[tuple[Any, int]]:
    """Set every ``layer_idx`` attribute inside layer ``i`` to ``i``; return the old values."""
    old = []
    for new_idx, layer in enumerate(layers):
        for module in layer.modules():
            value = getattr(module, "layer_idx", None)
            if isinstance(value, int) and not isinstance(value, bool):
                old.append((module, value))
                module.layer_idx = new_idx  # type: ignore[assignment]  # a plain int, not a submodule
    return old


def _probe_spec(model: Any, name: str) -> ArchSpec:
    """Fallback for unregistered classes: find the ModuleList as long as num_hidden_layers."""
    import torch

    text_config = model.config.get_text_config(decoder=True)
    n = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(n, int) or model.get_output_embeddings() is None:
        raise _unsupported(name, "it has no num_hidden_layers or no LM head")
    found = [
        path for path, mod in model.named_modules()
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and "vision" not in path and "visual" not in path
    ]
    if len(found) != 1:
        raise _unsupported(name, f"probing found {len(found)} candidate decoder ModuleLists of length {n}")
    parent = found[0].rpartition(".")[0]
    norm = _first(model, (f"{parent}.norm", f"{parent}.final_layernorm", f"{parent}.final_norm"))
    if norm is None:
        raise _unsupported(name, f"no final norm next to {found[0]}")
    log.warning("architecture %s is not registered; probed decoder layers at %s", name, found[0])
    return ArchSpec(name=name, layer_paths=(found[0],), norm_paths=(norm[0],), why="probed")


def decoder_spec(model: Any) -> DecoderSpec:
    """Bind the architecture spec for ``model`` (registered, else probed)."""
    name = type(model).__name__
    arch = REGISTRY.get(name) or _probe_spec(model, name)
    layers = _first(model, arch.layer_paths)
    norm = _first(model, arch.norm_paths)
    if layers is None or norm is None:
        raise _unsupported(name, f"none of the layer paths {arch.layer_paths} / norm paths {arch.norm_paths} "
                                 "exist in this transformers version")
    spec = DecoderSpec(arch=arch, model=model, layers_path=layers[0], norm_path=norm[0])
    spec.original_indices = list(range(spec.num_layers))
    declared = getattr(spec.text_config, "num_hidden_layers", spec.num_layers)
    if declared != spec.num_layers:
        raise UnsupportedArchitectureError(
            f"{name}: config says {declared} layers but {layers[0]} holds {spec.num_layers}; the checkpoint is inconsistent"
        )
    return spec


__all__ = ["ArchSpec", "DecoderSpec", "REGISTRY", "decoder_spec", "register", "resolve", "supported_architectures"]
