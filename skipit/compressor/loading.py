"""Load a model directory (safetensors, sharded too) or a GGUF file, with its tokenizer/processor.

Safety defaults: no remote code and no pickle (``.bin``) weights unless asked for. Weight files are
checked before transformers touches them, so a truncated download gets a clear error naming the file.
The input is only ever read.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skipit.compat import load_overrides
from skipit.errors import ModelLoadError, UnsupportedArchitectureError

log = logging.getLogger(__name__)

#: Files carried over from the input directory into the slim checkpoint (tokenizer, processor, templates).
PROCESSOR_FILE_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.tiktoken",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    "chat_template*", "spiece.model", "sentencepiece*.model",
)
_DTYPES = ("float32", "float16", "bfloat16", "auto")


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model. ``dtype`` is one of float32/float16/bfloat16/auto."""

    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ModelLoadError(f"--dtype {self.dtype!r} is not one of {', '.join(_DTYPES)}")


@dataclass
class LoadedModel:
    """A loaded model plus what came with it.

    Attributes:
        model: the transformers model, in eval mode.
        processor: a tokenizer (text models) or a processor (VLMs).
        source: the path the user gave.
        model_dir: directory holding config/tokenizer files (the GGUF's folder for GGUF input).
        gguf_file: the GGUF file name when loaded from GGUF.
        processor_note: how the processor was obtained, when it needed a workaround.
    """

    model: Any
    processor: Any
    source: Path
    model_dir: Path
    gguf_file: str | None = None
    processor_note: str | None = None

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)


def check_safetensors(path: Path) -> None:
    """Raise :class:`ModelLoadError` if ``path`` is not a complete safetensors file."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError(f"header length {header_len} exceeds file size {size}")
            header = json.loads(fh.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{path} is not a valid safetensors file ({exc}); the file is corrupt or truncated — download it again"
        ) from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise ModelLoadError(
            f"{path} is truncated: its header promises {8 + header_len + end} bytes but the file has {size}; download it again"
        )


def _check_weights(model_dir: Path, options: LoadOptions) -> None:
    safetensors = sorted(model_dir.glob("*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"{index} is not a valid shard index ({exc})") from None
        missing = sorted(s for s in shards if not (model_dir / s).exists())
        if missing:
            raise ModelLoadError(f"{model_dir} is missing weight shards listed in {index.name}: {', '.join(missing)}")
    for path in safetensors:
        check_safetensors(path)
    if safetensors:
        return
    pickles = sorted(model_dir.glob("*.bin")) + sorted(model_dir.glob("*.pt"))
    if pickles and not options.allow_pickle:
        raise ModelLoadError(
            f"{model_dir} has only pickle weights ({pickles[0].name}); loading pickles can run arbitrary code. "
            "Pass --allow-pickle if you trust this checkpoint, or convert it to safetensors"
        )
    if not pickles:
        raise ModelLoadError(f"{model_dir} has a config.json but no weights (*.safetensors); is the download complete?")


def _read_config(model_dir: Path, options: LoadOptions) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.exists():
        ggufs = sorted(model_dir.glob("*.gguf"))
        hint = f" It holds GGUF files; pass one of them: {ggufs[0]}" if ggufs else ""
        raise ModelLoadError(f"{model_dir} is not a model directory: it has no config.json.{hint}")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc})") from None
    if config.get("auto_map") and not options.trust_remote_code:
        raise ModelLoadError(
            f"{model_dir} asks for custom code (auto_map in config.json); skipit does not run remote code "
            "unless you pass --trust-remote-code after reading that code"
        )
    return config


def _model_class(architecture: str | None, options: LoadOptions) -> Any:
    import transformers

    from skipit.compressor.arch import supported_architectures

    cls = getattr(transformers, architecture, None) if architecture else None
    if cls is None:
        if options.trust_remote_code:
            return transformers.AutoModelForCausalLM
        raise UnsupportedArchitectureError(
            f"config.json names architecture {architecture!r}, which transformers "
            f"{transformers.__version__} does not provide. Supported: {', '.join(supported_architectures())}"
        )
    return cls


def _dtype(options: LoadOptions) -> Any:
    import torch

    return "auto" if options.dtype == "auto" else getattr(torch, options.dtype)


def processor_class(name: str) -> type:
    """``transformers.<name>``, minus its video processor when torchvision is missing.

    Qwen2-VL / Qwen2.5-VL processors declare a ``video_processor``; without torchvision (it does not
    import beside torch 2.13 CPU) they cannot be built at all, not even with ``video_processor=None``,
    because every declared sub-processor is type-checked against a class that is then not exported.
    The sub-processors are read from ``__init__``'s signature, so a subclass without that parameter is
    an image+text processor. It keeps the original name so saved configs name the real class.
    """
    import transformers

    cls = getattr(transformers, name)
    # 5.x reads sub-processors from __init__ (get_attributes); 4.x lists them in a class attribute.
    declared = cls.get_attributes() if hasattr(cls, "get_attributes") else cls.attributes
    if transformers.utils.is_torchvision_available() or "video_processor" not in declared:
        return cls

    class ImageTextOnly(cls):  # type: ignore[valid-type, misc]
        attributes = [a for a in declared if a != "video_processor"]  # 4.x only; 5.x reads the signature

        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
            self.video_processor = None

    ImageTextOnly.__name__ = ImageTextOnly.__qualname__ = name
    return ImageTextOnly


def _saved_processor_class(model_dir: Path) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = model_dir / name
        if path.is_file():
            found = json.loads(path.read_text()).get("processor_class")
            if found:
                return found
    return None


def load_processor(model_dir: Path, is_vlm: bool, options: LoadOptions, gguf_file: str | None = None) -> tuple[Any, str | None]:
    """Load the tokenizer (text) or processor (VLM) saved beside a model; return it and a note.

    The note says when the processor had to be built without video support (see :func:`processor_class`).
    """
    import transformers

    kw: dict[str, Any] = {"trust_remote_code": options.trust_remote_code}
    name = _saved_processor_class(model_dir) if is_vlm and not gguf_file else None
    try:
        if gguf_file:
            return transformers.AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file), None
        if name is None:
            return transformers.AutoTokenizer.from_pretrained(model_dir, **kw), None
        cls = processor_class(name)
        note = None if cls is getattr(transformers, name) else (
            f"{name} built without its video processor (torchvision is not importable); images and text work")
        return cls.from_pretrained(model_dir, **kw), note
    except (OSError, ValueError, AttributeError, ImportError, TypeError) as exc:  # 4.x: TypeError on a missing vocab file
        what = "processor" if name else "tokenizer"
        raise ModelLoadError(f"{model_dir} has no usable {what} ({str(exc).splitlines()[0]}); "
                             f"copy the {what} files next to config.json") from None


def load_model(path: str | Path, options: LoadOptions = LoadOptions()) -> LoadedModel:
    """Load a model directory or ``.gguf`` file read-only, with its tokenizer or processor."""
    import torch
    import transformers

    from skipit.compressor.arch import REGISTRY

    source = Path(path)
    if not source.exists():
        raise ModelLoadError(f"{source} does not exist; give a model directory (config.json + *.safetensors) or a .gguf file")
    gguf_file = None
    if source.is_file():
        if source.suffix != ".gguf":
            raise ModelLoadError(f"{source} is a file but not a .gguf; give a model directory or a .gguf file")
        model_dir, gguf_file = source.parent, source.name
        cls = transformers.AutoModelForCausalLM
        is_vlm = False
    else:
        model_dir = source
        config = _read_config(model_dir, options)
        _check_weights(model_dir, options)
        arch = (config.get("architectures") or [None])[0]
        cls = _model_class(arch, options)
        is_vlm = REGISTRY[arch].is_vlm if arch in REGISTRY else "vision_config" in config
    kwargs: dict[str, Any] = {"dtype": _dtype(options), "trust_remote_code": options.trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if not options.allow_pickle:
        kwargs["use_safetensors"] = None if gguf_file else True
    if not gguf_file:
        kwargs.update(load_overrides(model_dir))
    log.info("loading %s with %s", source, getattr(cls, "__name__", cls))
    try:
        model = cls.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"transformers could not load {source}: {str(exc).splitlines()[0]}") from None
    if gguf_file:
        # A dequantized GGUF model still carries the GGUF quantizer; save_pretrained refuses it (5.x).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(_dtype(options) if options.dtype != "auto" else torch.float32)
    model.to(options.device).eval()
    processor, note = load_processor(model_dir, is_vlm, options, gguf_file)
    if note:
        log.warning(note)
    return LoadedModel(model, processor, source, model_dir, gguf_file, note)
