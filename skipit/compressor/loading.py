"""Load a model directory (safetensors, sharded too) or a GGUF file, with its tokenizer/processor.

Safety defaults: no remote code and no pickle (``.bin``) weights unless asked for. Weight files are
checked before transformers touches them, so a truncated download gets a clear error naming the file.
The input is only ever read.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from skipit.compat import load_overrides
from skipit.compressor.placement import (all_on_disk, check_device, check_max_memory, input_device, offload_folder,
                                         parse_max_memory, placement_summary)
from skipit.errors import InvalidOptionError, ModelLoadError, UnsupportedArchitectureError, first_line

log = logging.getLogger(__name__)

#: Files carried over from the input directory into the slim checkpoint (tokenizer, processor, templates).
PROCESSOR_FILE_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.tiktoken",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    "chat_template*", "spiece.model", "sentencepiece*.model",
)
_DTYPES = ("float32", "float16", "bfloat16", "auto")
#: How many tensor names a weights/config mismatch error lists before "… and N more".
SHOWN_KEYS = 4
_LAYER_INDEX = re.compile(r"\blayers\.(\d+)\.")
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model.

    Attributes:
        dtype: float32, float16, bfloat16 or auto.
        device: a torch device (``cpu``, ``cuda:1`` …), or ``auto``: accelerate's big-model inference places
            the model over every GPU, then the CPU, then disk (``from_pretrained(device_map="auto")``), as
            ``max_memory`` allows; the same code takes the GPUs on a GPU machine and the CPU (and disk) elsewhere.
        max_memory: with ``auto``, the most bytes each device may hold: keys are GPU indices, ``cpu`` and
            ``disk`` (``--max-memory 0=20GiB,cpu=60GiB``; :func:`parse_max_memory`). None: what is free.
        offload_dir: with ``auto``, where weights offloaded to disk are written (a fresh subfolder, removed
            when the model is); default: the run's scratch folder beside the output, else the system
            temporary folder. Weights of a safetensors checkpoint are read where they lie and not copied.
    """

    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    max_memory: dict[int | str, int] | None = None
    offload_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ModelLoadError(f"--dtype {self.dtype!r} is not one of {', '.join(_DTYPES)}")
        if isinstance(self.max_memory, str):
            object.__setattr__(self, "max_memory", parse_max_memory(self.max_memory))
        if self.device != "auto":
            if self.max_memory is not None or self.offload_dir is not None:
                raise InvalidOptionError("--max-memory and --offload-dir place a model over several devices: add "
                                         f"--device auto (got --device {self.device})")
            check_device(self.device)
            return
        if self.max_memory is not None:
            check_max_memory(self.max_memory)
        if self.offload_dir is not None:
            folder = Path(self.offload_dir)
            if folder.exists() and not folder.is_dir():
                raise InvalidOptionError(f"--offload-dir {folder} is not a folder; give a folder on a disk with room "
                                         "for the weights that do not fit in memory")

    @property
    def dispatched(self) -> bool:
        """Whether the model is placed by accelerate (``device="auto"``)."""
        return self.device == "auto"


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
    #: with ``--device auto``: accelerate's placement of the model's modules (``hf_device_map``)
    device_map: dict[str, Any] | None = None
    #: with ``--device auto``: the folder of weights offloaded to disk (removed with the model, or by :meth:`release`)
    offload_folder: Path | None = None

    def release(self) -> None:
        """Remove the offload folder now (the model cannot run afterwards if it had weights there)."""
        if self.offload_folder is not None:
            shutil.rmtree(self.offload_folder, ignore_errors=True)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def input_device(self) -> Any:
        """Where inputs go (see :func:`input_device`)."""
        return input_device(self.model)


def _safetensors_data_end(header: Any) -> int:
    """The end of the data section a safetensors header describes; ``ValueError`` if it is malformed."""
    if not isinstance(header, dict):
        raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {name!r} has no valid data_offsets [begin, end]")
        end = max(end, offsets[1])
    return end


def check_safetensors(path: Path) -> None:
    """Raise :class:`ModelLoadError` if ``path`` is not a complete safetensors file."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError(f"header length {header_len} exceeds file size {size}")
            end = _safetensors_data_end(json.loads(fh.read(header_len)))
    except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelLoadError(
            f"{path} is not a valid safetensors file ({exc}); the file is corrupt or truncated — download it again"
        ) from None
    if 8 + header_len + end > size:
        raise ModelLoadError(
            f"{path} is truncated: its header promises {8 + header_len + end} bytes but the file has {size}; download it again"
        )


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """``path`` parsed as a JSON object; :class:`ModelLoadError` naming ``what`` the file is otherwise."""
    try:
        value = json.loads(path.read_bytes())
    except OSError as exc:
        raise ModelLoadError(f"{path} cannot be read ({exc.strerror or exc}); it should be a {what} file") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ModelLoadError(f"{path} is not valid JSON ({exc}); it should be a {what} — download it again") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(value).__name__}, not the JSON object a {what} is; "
                             "the file is damaged or not what its name says — download it again")
    return value


def _check_weights(model_dir: Path, options: LoadOptions) -> None:
    safetensors = sorted(model_dir.glob("*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(f"{index} is not a valid shard index (no weight_map of tensor → file names); "
                                 "download it again")
        shards = set(weight_map.values())
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
    config = read_json_object(path, "model config")
    architectures = config.get("architectures")
    if architectures is not None and not (isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        raise ModelLoadError(f"{path}: \"architectures\" must be a list of class names such as [\"LlamaForCausalLM\"], "
                             f"got {architectures!r}")
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


def processor_class(name: str) -> Any:
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
            found = read_json_object(path, "processor config").get("processor_class")
            if found:
                return str(found)
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
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception on a broken vocabulary
        # (e.g. a merge naming a token that is not in it); 4.x raises TypeError on a missing vocab file.
        if gguf_file:
            raise ModelLoadError(f"the tokenizer of {model_dir / gguf_file} cannot be built ({first_line(exc)}); its "
                                 "tokenizer metadata is damaged or of an unsupported kind — download the file again") from None
        what = "processor" if name else "tokenizer"
        raise ModelLoadError(f"{model_dir} has no usable {what} ({first_line(exc)}); "
                             f"copy the {what} files next to config.json") from None


def _gguf_value(reader: Any, key: str) -> Any:
    """A scalar metadata value of a ``GGUFReader`` (str or number), or None when the key is absent."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    part = field.parts[field.data[0]]
    if field.types and field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8", "replace")
    return part.tolist()[0]


def _index_ranges(indices: Iterable[int]) -> str:
    """``0–5, 7`` for ``[0, 1, 2, 3, 4, 5, 7]``; ``none`` for nothing."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}–{b}" if b > a else str(a) for a, b in runs) or "none"


def check_gguf(path: Path) -> None:
    """Raise :class:`ModelLoadError` unless ``path`` is a readable GGUF whose blocks match its block count.

    transformers skips GGUF tensors it has no place for without a word, so blocks at or beyond
    ``<arch>.block_count`` would be dropped silently; blocks missing below it would be random. Both
    are refused here, and a file cut inside its header gets a clear message instead of ``struct.error``.
    """
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelLoadError(f"loading {path} needs the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(path)
        arch = _gguf_value(reader, "general.architecture")
        count = _gguf_value(reader, f"{arch}.block_count")
        names = [tensor.name for tensor in reader.tensors]
    except (struct.error, ValueError, KeyError, IndexError, TypeError, OSError, EOFError) as exc:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {first_line(exc)}); "
                             "it is corrupt or truncated — download it again") from None
    if not isinstance(count, int):
        raise ModelLoadError(f"{path} has no {arch}.block_count in its metadata, so its layer count is unknown; "
                             "the file is damaged or not a model — download it again")
    blocks = {int(m.group(1)) for name in names if (m := _GGUF_BLOCK.match(name))}
    if blocks != set(range(count)):
        extra, missing = sorted(b for b in blocks if b >= count), sorted(set(range(count)) - blocks)
        what = "; ".join(part for part in (
            f"the tensors of block(s) {_index_ranges(extra)} would be dropped" if extra else "",
            f"block(s) {_index_ranges(missing)} would be random" if missing else "") if part)
        raise ModelLoadError(f"{path}: its metadata says {count} blocks ({arch}.block_count) but its tensors are for "
                             f"blocks {_index_ranges(blocks)} ({what}); the file was cut or edited — download it again")


def _benign_unexpected(key: str) -> bool:
    """Checkpoint tensors a model legitimately recomputes: RoPE ``inv_freq`` and ``position_ids`` buffers that
    older checkpoints saved (today they are non-persistent buffers, so they are never *missing*)."""
    return key.endswith(("rotary_emb.inv_freq", "position_ids"))


def _mismatch(entry: Any) -> str:
    """A mismatched-key entry in words: 5.x gives (name, checkpoint shape, model shape), 4.x the name alone."""
    if isinstance(entry, str):
        return entry
    name, have, want = entry[:3]
    return f"{name} is {list(have)} in the weights but {list(want)} in the model"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _named(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")


def check_loading_info(info: dict[str, Any], source: Path, described_by: str) -> None:
    """Raise :class:`ModelLoadError` if ``from_pretrained``'s loading info reports any missing, unexpected or
    wrong-shaped weight: such a model has random or dropped parts and must not be certified.

    ``described_by`` names what declares the model's shape (``config.json``, the GGUF metadata).
    Tied weights and non-persistent buffers are not reported by transformers, so a healthy checkpoint
    passes; see :func:`_benign_unexpected` for the only keys forgiven here.
    """
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not _benign_unexpected(k))
    mismatched = sorted(map(_mismatch, info.get("mismatched_keys") or ()))
    problems = []
    if missing:
        problems.append(f"missing from the weights, so random: {_plural(len(missing), 'tensor')} ({_named(missing)})")
    if unexpected:
        problems.append(f"in the weights but not in the model, so dropped: {_plural(len(unexpected), 'tensor')} "
                        f"({_named(unexpected)})")
    if mismatched:
        problems.append(f"of the wrong shape: {_plural(len(mismatched), 'tensor')} ({_named(mismatched)})")
    if not problems:
        return
    layers = {int(m.group(1)) for k in (*missing, *unexpected) if (m := _LAYER_INDEX.search(k))}
    hint = (f" Layers involved: {_index_ranges(layers)} — does the layer count in {described_by} match the weights?"
            if layers else "")
    raise ModelLoadError(f"{source}: the weights do not match {described_by}: {'; '.join(problems)}.{hint} "
                         f"Fix {described_by} or download the checkpoint again; skipit does not certify a model "
                         "that was not loaded whole")


def load_model(path: str | Path, options: LoadOptions = LoadOptions()) -> LoadedModel:
    """Load a model directory or ``.gguf`` file read-only, with its tokenizer or processor."""
    import torch
    import transformers

    from skipit.compressor.arch import REGISTRY

    source = Path(path)
    if not source.exists():
        raise ModelLoadError(f"{source} does not exist; give a model directory (config.json + *.safetensors) or a .gguf file")
    gguf_file = None
    cls: Any
    if source.is_file():
        if source.suffix != ".gguf":
            raise ModelLoadError(f"{source} is a file but not a .gguf; give a model directory or a .gguf file")
        check_gguf(source)
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
    # Wrong shapes are reported in the loading info (and refused below) rather than raised without names.
    kwargs: dict[str, Any] = {"dtype": _dtype(options), "trust_remote_code": options.trust_remote_code,
                              "output_loading_info": True, "ignore_mismatched_sizes": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if not options.allow_pickle:
        kwargs["use_safetensors"] = None if gguf_file else True
    if not gguf_file:
        kwargs.update(load_overrides(model_dir))
    offload = None
    if options.dispatched:
        # accelerate's big-model inference: GPUs first, then CPU, then disk, within max_memory; the dtype is given
        # here because a dispatched model cannot be moved or cast afterwards
        offload = offload_folder(options.offload_dir)
        kwargs.update(device_map="auto", offload_folder=str(offload))
        if options.max_memory is not None:
            kwargs["max_memory"] = dict(options.max_memory)
        if gguf_file and options.dtype == "auto":
            kwargs["dtype"] = torch.float32
    log.info("loading %s with %s", source, getattr(cls, "__name__", cls))
    try:
        try:
            model, info = cls.from_pretrained(model_dir, **kwargs)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError
            if not (offload is not None and "device disk is invalid" in str(exc)):
                raise
            # transformers 4.x opens the weights on the device of a whole-model entry, so a model placed entirely
            # on disk (device_map {"": "disk"}) fails to load; the same placement spelled per top-level module works
            kwargs["device_map"] = all_on_disk(cls, model_dir, options.trust_remote_code)
            model, info = cls.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, IndexError, TypeError, NotImplementedError, struct.error) as exc:
        if offload is not None:
            shutil.rmtree(offload, ignore_errors=True)
        raise ModelLoadError(f"transformers could not load {source}: {first_line(exc)}") from None
    if offload is not None:
        weakref.finalize(model, shutil.rmtree, offload, True)  # the offloaded weights go with the model
    check_loading_info(info, source, "its GGUF metadata" if gguf_file else "config.json")
    if gguf_file:
        # A dequantized GGUF model still carries the GGUF quantizer; save_pretrained refuses it (5.x).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if not options.dispatched:
            model.to(_dtype(options) if options.dtype != "auto" else torch.float32)
    if not options.dispatched:
        model.to(options.device)
    model.eval()
    device_map = dict(getattr(model, "hf_device_map", None) or {}) or None
    if device_map:
        log.info("placed by accelerate: %s", placement_summary(device_map))
    processor, note = load_processor(model_dir, is_vlm, options, gguf_file)
    if note:
        log.warning(note)
    return LoadedModel(model, processor, source, model_dir, gguf_file, note, device_map, offload)
