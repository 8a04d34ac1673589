"""Tiny random transformers checkpoints built from config in code (no downloads).

Each builder writes a directory that reloads with plain
``AutoModelForCausalLM`` (text) or ``AutoModelForImageTextToText`` (VLMs)
``.from_pretrained`` plus a matching tokenizer / processor.

Everything is data: ``SPECS`` holds, per model class, the config kwargs, the
extra special tokens, and (for VLMs) the image processor / processor setup.
``build`` is the one generic builder.  Token ids inside config kwargs are
written as ``Tok("<image>")`` and resolved against the tokenizer at build time.

Usage::

    from tiny_models import ARCHITECTURES, make_inputs  # tests/ is on sys.path (conftest)
    d = ARCHITECTURES["LlavaForConditionalGeneration"](tmp_path / "llava")
    model = AutoModelForImageTextToText.from_pretrained(d)
    logits = model(**make_inputs(d, "hi", image)).logits
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

_TX5 = int(transformers.__version__.split(".")[0]) >= 5
# The PIL image processors are `XImageProcessorPil` in 5.x and plain `XImageProcessor` in 4.x.
_PIL = "Pil" if _TX5 else ""

SEED = 0
VOCAB_SIZE = 320  # >= len(tokenizer) for every arch (bytes + specials)
IMAGE_SIZE = 56  # pixels; with patch 14 -> 4x4 patches
PATCH = 14

PAD, EOS, BOS = "<pad>", "</s>", "<s>"  # ids 0, 1, 2 (matches Gemma defaults)

# Heterogeneous, non-periodic attention pattern: a layer-slicing bug that
# keeps the wrong entries of `layer_types` changes the model.
LAYER_TYPES = [
    "full_attention",
    "sliding_attention",
    "sliding_attention",
    "full_attention",
    "sliding_attention",
    "full_attention",
]
SLIDING_WINDOW = 8  # shorter than typical test prompts, so it matters


class Tok(str):
    """Placeholder for a token id inside config kwargs: ``Tok("<image>")``."""


# --------------------------------------------------------------------------- tables

# Shared decoder kwargs (hidden 64, 6 layers, GQA 4/2, head_dim 16).
TEXT = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=len(LAYER_TYPES),
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=Tok(PAD),
    bos_token_id=Tok(BOS),
    eos_token_id=Tok(EOS),
)
SLIDING = dict(layer_types=LAYER_TYPES, sliding_window=SLIDING_WINDOW)
QWEN_SLIDING = dict(SLIDING, use_sliding_window=True, max_window_layers=0)
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16)
# M-RoPE: sections must sum to head_dim / 2 = 8.
# (4.x spells it rope_scaling + rope_theta; 5.x moved both under rope_parameters)
MROPE = (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}) if _TX5
         else dict(rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=10000.0))

QWEN_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_VL_IMAGE_PROCESSOR = (
    "Qwen2VLImageProcessor" + _PIL,
    # min == max pixels -> every image is resized to 56x56 -> 4x4 patches -> 4 tokens after 2x2 merge
    dict(size={"shortest_edge": IMAGE_SIZE**2, "longest_edge": IMAGE_SIZE**2}, patch_size=PATCH, merge_size=2),
)
QWEN_VL_TOP = dict(
    image_token_id=Tok("<|image_pad|>"),
    video_token_id=Tok("<|video_pad|>"),
    vision_start_token_id=Tok("<|vision_start|>"),
    vision_end_token_id=Tok("<|vision_end|>"),
)
IDEFICS3_TOKENS = [
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
]


@dataclass(frozen=True)
class Spec:
    config: dict[str, Any]  # kwargs for AutoConfig.for_model(model_type, **config)
    model_type: str
    tie: bool = False  # tie_word_embeddings
    extra_tokens: tuple[str, ...] = ()
    # VLM only
    image_processor: tuple[str, dict] | None = None  # (class name, kwargs)
    processor: tuple[str, dict] | None = None  # (class name, kwargs)
    image_prompt: str = ""  # what to put in the text where the image goes
    text_key: str | None = None  # sub-config holding the decoder (None: top-level config)
    arch: str | None = None  # model class, when the table key is not the class name (VARIANTS)

    @property
    def is_vlm(self) -> bool:
        return self.processor is not None


SPECS: dict[str, Spec] = {
    "LlamaForCausalLM": Spec(model_type="llama", tie=True, config=dict(TEXT)),
    # AutoTokenizer reloads a qwen2 checkpoint as Qwen2Tokenizer, which appends
    # "<|endoftext|>" as unk if missing; include it so len(tokenizer) is stable.
    "Qwen2ForCausalLM": Spec(
        model_type="qwen2", tie=True, extra_tokens=("<|endoftext|>",), config=dict(TEXT, **QWEN_SLIDING)
    ),
    "Qwen3ForCausalLM": Spec(model_type="qwen3", tie=True, config=dict(TEXT, head_dim=16, **QWEN_SLIDING)),
    "MistralForCausalLM": Spec(model_type="mistral", config=dict(TEXT, sliding_window=None)),
    "Gemma2ForCausalLM": Spec(model_type="gemma2", tie=True, config=dict(TEXT, **GEMMA, **SLIDING)),
    "Gemma3ForCausalLM": Spec(model_type="gemma3_text", tie=True, config=dict(TEXT, **GEMMA, **SLIDING)),
    "LlavaForConditionalGeneration": Spec(
        model_type="llava",
        extra_tokens=("<image>",),
        text_key="text_config",
        config=dict(
            text_config=dict(TEXT, model_type="llama"),
            vision_config=dict(
                model_type="clip_vision_model",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=IMAGE_SIZE,
                patch_size=PATCH,
                projection_dim=32,
            ),
            image_token_index=Tok("<image>"),
            image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        ),
        image_processor=(
            "CLIPImageProcessor" + _PIL,
            dict(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        ),
        processor=(
            "LlavaProcessor",
            dict(patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1),
        ),
        image_prompt="<image>",
    ),
    "Qwen2VLForConditionalGeneration": Spec(
        model_type="qwen2_vl",
        extra_tokens=tuple(QWEN_VL_TOKENS),
        text_key="text_config",
        config=dict(
            QWEN_VL_TOP,
            text_config=dict(TEXT, **QWEN_SLIDING, **MROPE),
            vision_config=dict(
                depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=PATCH, spatial_merge_size=2
            ),
        ),
        image_processor=QWEN_VL_IMAGE_PROCESSOR,
        processor=("Qwen2VLProcessor", {}),
        image_prompt="<|vision_start|><|image_pad|><|vision_end|>",
    ),
    "Qwen2_5_VLForConditionalGeneration": Spec(
        model_type="qwen2_5_vl",
        extra_tokens=tuple(QWEN_VL_TOKENS),
        text_key="text_config",
        config=dict(
            QWEN_VL_TOP,
            text_config=dict(TEXT, **QWEN_SLIDING, **MROPE),
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                patch_size=PATCH,
                spatial_merge_size=2,
                window_size=2 * 2 * PATCH,  # 2x2 merged tokens per window
                fullatt_block_indexes=[1],
            ),
        ),
        image_processor=QWEN_VL_IMAGE_PROCESSOR,
        processor=("Qwen2_5_VLProcessor", {}),
        image_prompt="<|vision_start|><|image_pad|><|vision_end|>",
    ),
    "Idefics3ForConditionalGeneration": Spec(
        model_type="idefics3",
        extra_tokens=tuple(IDEFICS3_TOKENS),
        text_key="text_config",
        config=dict(
            text_config=dict(TEXT, model_type="llama"),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=IMAGE_SIZE,
                patch_size=PATCH,
            ),
            image_token_id=Tok("<image>"),
            scale_factor=2,
        ),
        image_processor=(
            "Idefics3ImageProcessor" + _PIL,
            dict(
                do_image_splitting=False,
                size={"longest_edge": IMAGE_SIZE},
                max_image_size={"longest_edge": IMAGE_SIZE},
            ),
        ),
        # (56/14)^2 patches / scale_factor^2
        processor=("Idefics3Processor", dict(image_seq_len=(IMAGE_SIZE // PATCH) ** 2 // 4)),
        image_prompt="<image>",
    ),
}

TEXT_ARCHS: list[str] = [k for k, s in SPECS.items() if not s.is_vlm]
VLM_ARCHS: list[str] = [k for k, s in SPECS.items() if s.is_vlm]

# --------------------------------------------------------------------------- second configurations
# One more tiny VLM per architecture with other dimensions than SPECS: 8 decoder layers (MHA, hidden 64),
# patch 8 instead of 14, grids that are not powers of two (6x6 patches: Idefics3's float position buckets),
# and processors that do not force one image size (Qwen: variable grids; Idefics3: image splitting on).
# `build(name, dir)` builds them (conftest's tiny_model_dir(name) too) for the VLM end-to-end tests;
# SPECS stays as the other tests know it.
P8 = 8
LAYER_TYPES_8 = [*LAYER_TYPES, "sliding_attention", "full_attention"]
TEXT_8 = dict(TEXT, num_hidden_layers=len(LAYER_TYPES_8), num_key_value_heads=4, intermediate_size=96)
QWEN_SLIDING_8 = dict(QWEN_SLIDING, layer_types=LAYER_TYPES_8)
# min/max pixels 32x32 .. 64x64 with factor 16 (patch 8 x merge 2): 2x2 .. 4x4 merged tokens, any aspect ratio
QWEN_VL_IMAGE_PROCESSOR_P8 = (
    "Qwen2VLImageProcessor" + _PIL,
    dict(size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}, patch_size=P8, merge_size=2),
)


def _variant(arch: str, **changes: Any) -> Spec:
    """``SPECS[arch]`` with other fields (config, processors)."""
    return replace(SPECS[arch], arch=arch, **changes)


def _qwen_vl_p8(arch: str, vision_config: dict[str, Any]) -> Spec:
    """Qwen2-VL / Qwen2.5-VL with the 8-layer decoder and the variable-size image processor."""
    text_config = dict(TEXT_8, **QWEN_SLIDING_8, **MROPE)
    return _variant(arch, config=dict(QWEN_VL_TOP, text_config=text_config, vision_config=vision_config),
                    image_processor=QWEN_VL_IMAGE_PROCESSOR_P8)


VARIANTS: dict[str, Spec] = {
    "llava-p8": _variant(
        "LlavaForConditionalGeneration",
        config=dict(
            SPECS["LlavaForConditionalGeneration"].config,
            text_config=dict(TEXT_8, model_type="llama"),
            vision_config=dict(
                model_type="clip_vision_model", hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=3, image_size=48, patch_size=P8, projection_dim=48,
            ),
            image_seq_length=(48 // P8) ** 2,
            vision_feature_layer=-2,
        ),
        image_processor=("CLIPImageProcessor" + _PIL, dict(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})),
        processor=("LlavaProcessor", dict(patch_size=P8, vision_feature_select_strategy="default", num_additional_image_tokens=1)),
    ),
    "qwen2-vl-p8": _qwen_vl_p8(
        "Qwen2VLForConditionalGeneration",
        dict(depth=3, embed_dim=48, hidden_size=64, num_heads=3, mlp_ratio=2, patch_size=P8, spatial_merge_size=2),
    ),
    "qwen2.5-vl-p8": _qwen_vl_p8(
        "Qwen2_5_VLForConditionalGeneration",
        dict(
            depth=3, hidden_size=48, intermediate_size=96, num_heads=3, out_hidden_size=64, patch_size=P8,
            spatial_merge_size=2,
            window_size=3 * 2 * P8,  # 3x3 merged tokens per window: images of 2..4 merged tokens a side pad it
            fullatt_block_indexes=[0, 2],
        ),
    ),
    # the configuration of issue 10: a 6x6 patch grid (image 48, patch 8), 9 image tokens per crop, image
    # splitting on (up to 2x2 crops of 48 + the global image)
    "idefics3-p8": _variant(
        "Idefics3ForConditionalGeneration",
        config=dict(
            text_config=dict(TEXT_8, model_type="llama"),
            vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
                               image_size=48, patch_size=P8),
            image_token_id=Tok("<image>"),
            scale_factor=2,
        ),
        image_processor=(
            "Idefics3ImageProcessor" + _PIL,
            dict(do_image_splitting=True, size={"longest_edge": 96}, max_image_size={"longest_edge": 48}),
        ),
        processor=("Idefics3Processor", dict(image_seq_len=(48 // P8) ** 2 // 4)),
    ),
}


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(extra_special_tokens: list[str] | tuple[str, ...] = (), cls: type = PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: 3 specials + 256 byte tokens + extras, as ``cls``."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, BOS, *alphabet])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD, EOS, BOS, *extra_special_tokens])
    return cls(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        # transformers 4.x calls these additional_special_tokens (its extra_special_tokens is a dict)
        **{"extra_special_tokens" if _TX5 else "additional_special_tokens": list(extra_special_tokens)},
        model_input_names=["input_ids", "attention_mask"],
    )


def _resolve(obj: Any, tokenizer) -> Any:
    if isinstance(obj, Tok):
        return tokenizer.convert_tokens_to_ids(str(obj))
    if isinstance(obj, dict):
        return {k: _resolve(v, tokenizer) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v, tokenizer) for v in obj]
    return obj


# --------------------------------------------------------------------------- build


def _spec(name: str) -> Spec:
    """A table entry: a model class of SPECS or a configuration of VARIANTS."""
    return SPECS[name] if name in SPECS else VARIANTS[name]


def build_config(name: str, tokenizer) -> transformers.PreTrainedConfig:
    spec = _spec(name)
    kwargs = _resolve(spec.config, tokenizer)
    kwargs["architectures"] = [spec.arch or name]
    kwargs["tie_word_embeddings"] = spec.tie
    if spec.text_key:
        kwargs[spec.text_key]["tie_word_embeddings"] = spec.tie
    return transformers.AutoConfig.for_model(spec.model_type, **kwargs)


def build(name: str, out_dir: Path) -> Path:
    """Build the tiny random ``name`` model (a SPECS class or a VARIANTS key), save it with its tokenizer/processor."""
    spec = _spec(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # 4.x processors type-check their tokenizer (Qwen2-VL wants a Qwen2 tokenizer); 5.x accepts any fast one.
    tok_cls = transformers.Qwen2TokenizerFast if not _TX5 and spec.model_type.startswith("qwen2") else PreTrainedTokenizerFast
    tokenizer = build_tokenizer(spec.extra_tokens, tok_cls)
    assert len(tokenizer) <= VOCAB_SIZE, (name, len(tokenizer))

    torch.manual_seed(SEED)
    config = build_config(name, tokenizer)
    model = getattr(transformers, spec.arch or name)(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)

    if spec.is_vlm:
        ip_cls, ip_kwargs = spec.image_processor
        image_processor = getattr(transformers, ip_cls)(**ip_kwargs)
        proc_cls, proc_kwargs = spec.processor
        processor = _processor_class(proc_cls)(image_processor=image_processor, tokenizer=tokenizer, **proc_kwargs)
        processor.save_pretrained(out_dir)
    else:
        tokenizer.save_pretrained(out_dir)
    return out_dir


ARCHITECTURES: dict[str, Callable[[Path], Path]] = {
    name: (lambda out_dir, _name=name: build(_name, out_dir)) for name in SPECS
}


# --------------------------------------------------------------------------- load / inputs


@functools.cache
def _processor_class(name: str) -> type:
    """The processor class, without video support when torchvision is missing (see skipit's loader)."""
    from skipit.compressor.loading import processor_class

    return processor_class(name)


def _arch(model_dir: Path) -> str:
    return json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]


def _saved_processor_class(model_dir: Path) -> str | None:
    for fname in ("processor_config.json", "preprocessor_config.json"):
        f = Path(model_dir) / fname
        if f.is_file() and (name := json.loads(f.read_text()).get("processor_class")):
            return name
    return None


def load_processor(model_dir: Path):
    """Tokenizer for text models, processor for VLMs.

    Recipe: read ``processor_class`` from ``processor_config.json`` (falls back to
    ``preprocessor_config.json``) and call ``<class>.from_pretrained(dir)`` on the
    class returned by ``_processor_class``.  With torchvision installed that is
    exactly ``AutoProcessor.from_pretrained``.  Without it, ``AutoProcessor`` fails
    for Qwen2-VL / Qwen2.5-VL ("Can't load video processor" / "requires the
    Torchvision library") and so does constructing the processor with
    ``video_processor=None``; the image+text-only subclass loads the image
    processor through ``AutoImageProcessor`` (-> ``Qwen2VLImageProcessorPil``)
    and the tokenizer through ``AutoTokenizer``.
    """
    name = _saved_processor_class(model_dir)
    if name is None:
        return transformers.AutoTokenizer.from_pretrained(model_dir)
    return _processor_class(name).from_pretrained(model_dir)


def make_inputs(model_dir: Path, text: str, image=None) -> dict:
    """Batch of one, ready for ``model(**inputs)`` / ``model.generate(**inputs)``; ``image`` may be a list
    (one image placeholder per image, in front of the text)."""
    model_dir = Path(model_dir)
    spec = SPECS[_arch(model_dir)]
    proc = load_processor(model_dir)
    if image is None:
        return dict(proc(text=[text], return_tensors="pt"))
    assert spec.is_vlm, "image given for a text-only model"
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    return dict(proc(text=[spec.image_prompt * len(images) + text], images=[images], return_tensors="pt"))
