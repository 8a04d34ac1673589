"""Where a model runs: ``--device`` and ``--device auto`` (accelerate's big-model placement), ``--max-memory``,
the disk-offload folder, and the device its inputs belong on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from skipit.errors import InvalidOptionError, first_line

#: ``--max-memory`` units (bytes per unit); decimal and binary, case-insensitive
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_MAX_MEMORY_HELP = ("give DEVICE=SIZE pairs separated by commas, e.g. --max-memory 0=20GiB,1=20GiB,cpu=60GiB "
                    "(devices: GPU indices, cpu, disk; sizes in B, KB, MB, GB, KiB, MiB, GiB …)")


def parse_size(text: str) -> int:
    """``20GiB`` → bytes; ``InvalidOptionError`` naming the accepted units otherwise."""
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise InvalidOptionError(f"--max-memory: {text.strip()!r} is not a size; {_MAX_MEMORY_HELP}")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_max_memory(text: str) -> dict[int | str, int]:
    """``0=20GiB,cpu=60GiB`` → ``{0: 21474836480, "cpu": 64424509440}`` (what ``from_pretrained(max_memory=)``
    takes); ``cuda:1`` is accepted for ``1``. Raises :class:`InvalidOptionError` (exit code 2) on bad syntax."""
    out: dict[int | str, int] = {}
    for part in (p for p in text.split(",") if p.strip()):
        key, sep, size = part.partition("=")
        key = key.strip().lower()
        if not sep or not key:
            raise InvalidOptionError(f"--max-memory: {part.strip()!r} is not DEVICE=SIZE; {_MAX_MEMORY_HELP}")
        device: int | str = int(key.removeprefix("cuda:")) if key.removeprefix("cuda:").isdigit() else key
        if device not in ("cpu", "disk", "mps") and not isinstance(device, int):
            raise InvalidOptionError(f"--max-memory: {key!r} is not a device; {_MAX_MEMORY_HELP}")
        if device in out:
            raise InvalidOptionError(f"--max-memory names {key!r} twice")
        out[device] = parse_size(size)
        if out[device] <= 0:
            raise InvalidOptionError(f"--max-memory: {part.strip()!r} gives no memory; {_MAX_MEMORY_HELP}")
    if not out:
        raise InvalidOptionError(f"--max-memory is empty; {_MAX_MEMORY_HELP}")
    return out


def check_max_memory(max_memory: dict[int | str, int]) -> None:
    """Refuse GPU indices this machine does not have (CPU-only: any GPU index)."""
    gpus = sorted(k for k in max_memory if isinstance(k, int))
    if not gpus:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [g for g in gpus if g >= count]
    if missing:
        have = f"GPUs 0 to {count - 1}" if count else "no GPU"
        raise InvalidOptionError(f"--max-memory names GPU {missing[0]}, but this machine has {have}; name only "
                                 "devices that exist (cpu, disk, and GPU indices)")


def input_device(model: Any) -> Any:
    """The device a model's inputs belong on: its only device, or, for a model dispatched by accelerate
    (``hf_device_map``), where its input embeddings run (an offloaded module runs on accelerate's main device:
    the first GPU of the map, else the CPU). A disk-offloaded model's parameters are on ``meta``, so
    ``model.device`` cannot be used for this."""
    import torch

    placement = getattr(model, "hf_device_map", None)
    if placement:
        main = next((d for d in placement.values() if d not in ("cpu", "disk")), "cpu")
        embeddings = model.get_input_embeddings()
        name = next((n for n, m in model.named_modules() if m is embeddings), "")
        keys = [k for k in placement if k == "" or name == k or name.startswith(k + ".")]
        where = placement[max(keys, key=len)] if keys else main
        where = main if where in ("cpu", "disk") else where
        return torch.device(where) if not isinstance(where, int) else torch.device("cuda", where)
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def offload_folder(offload_dir: Path | None) -> Path:
    """A fresh folder for disk-offloaded weights, inside ``offload_dir`` (``--offload-dir``) or the scratch folder."""
    import tempfile

    from skipit.compressor.reference import current_scratch

    root = offload_dir if offload_dir is not None else current_scratch()
    if root is not None:
        Path(root).mkdir(parents=True, exist_ok=True)
    try:
        return Path(tempfile.mkdtemp(prefix="skipit-offload-", dir=root))
    except OSError as exc:
        raise InvalidOptionError(f"cannot create an offload folder in {root or tempfile.gettempdir()} "
                                 f"({exc.strerror or exc}); give --offload-dir on a disk you can write to") from None


def check_device(device: str) -> None:
    """Raise :class:`InvalidOptionError` unless ``device`` names a torch device that exists here.

    ``cpu`` is accepted without importing torch (it is the default, and ``--help`` stays fast).
    """
    if device == "cpu":
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise InvalidOptionError(f"--device {device!r} is not a torch device ({first_line(exc)}); "
                                 "use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return
    backend = getattr(torch, parsed.type, None)
    if backend is None or not callable(getattr(backend, "is_available", None)) or not backend.is_available():
        raise InvalidOptionError(f"--device {device}: this torch {torch.__version__} has no {parsed.type} device; "
                                 "use --device cpu, or install a torch build for that device")
    count = getattr(backend, "device_count", lambda: 1)()
    if parsed.index is not None and parsed.index >= count:
        raise InvalidOptionError(f"--device {device}: there are only {count} {parsed.type} device(s) "
                                 f"({parsed.type}:0 to {parsed.type}:{count - 1})")


def all_on_disk(cls: Any, model_dir: Path, trust_remote_code: bool = False) -> dict[str, str]:
    """``{child: "disk"}`` for each top-level module of the model ``cls`` builds from ``model_dir``'s config."""
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        empty = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
    return {name: "disk" for name, _ in empty.named_children()}


def placement_summary(device_map: dict[str, Any]) -> str:
    """``cpu: 12 modules, disk: 20 modules`` for a device map."""
    counts = modules_per_device(device_map)
    return ", ".join(f"{k}: {v} module{'s' * (v != 1)}" for k, v in counts.items())


def modules_per_device(device_map: dict[str, Any]) -> dict[str, int]:
    """How many of a device map's modules each device (``cpu``, ``disk``, a GPU index) holds."""
    counts: dict[str, int] = {}
    for where in device_map.values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    return counts
