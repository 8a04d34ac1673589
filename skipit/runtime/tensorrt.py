"""TensorRT engines at run time, through Polygraphy's ``TrtRunner``: ``activate()`` → ``infer(feed)`` → ``close()``.

:class:`TrtRunner` adds what skipit's engines need on top of Polygraphy's runner: the sidecar check (an engine
runs only with the TensorRT version and on the GPU architecture it was built for), choosing the optimization
profile that holds the input shapes (by name, index, or automatically), inputs cast to the engine's types, and
outputs that stay valid after the next call. :class:`TrtDecoderRunner` runs a merged decoder engine step by
step — the prompt with one masked dummy past slot (:func:`with_dummy_past`; TensorRT profiles need every
dimension ≥ 1) — so the greedy loop and the speed measurement run engines like every other backend.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skipit.errors import EngineIncompatibleError, ExportError, InvalidOptionError
from skipit.exporters.onnx.convention import KV_NAME_RE, kv_layers
from skipit.exporters.tensorrt.engine import check_engine_compatible, current_env, import_tensorrt
from skipit.exporters.tensorrt.engine import polygraphy_logging, read_sidecar, require_cuda, sidecar_path
from skipit.runtime.base import HostTimedRunner
from skipit.runtime.decoder import KV, MergedDecoder

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

log = logging.getLogger(__name__)


def with_dummy_past(feed: Mapping[str, "np.ndarray"]) -> dict[str, "np.ndarray"]:
    """Rewrite a feed with an empty KV cache (past = 0) into the one-dummy-slot form TensorRT accepts.

    Each ``past_key_values.*`` becomes zeros of past length 1 and ``attention_mask`` gets a leading 0
    column, so the dummy is masked out; ``position_ids`` must be given explicitly (they are unchanged).
    A feed whose cache is not empty is returned unchanged (as a new dict).
    """
    import numpy as np

    out = dict(feed)
    kv = [n for n in feed if KV_NAME_RE.fullmatch(n)]
    empty = [n for n in kv if feed[n].shape[2] == 0]
    if not empty:
        return out
    if len(empty) != len(kv):
        raise InvalidOptionError("some past_key_values are empty and some are not; give all layers the same past")
    for name in kv:
        shape = list(feed[name].shape)
        shape[2] = 1
        out[name] = np.zeros(shape, dtype=feed[name].dtype)
    mask = np.asarray(feed["attention_mask"])
    out["attention_mask"] = np.concatenate([np.zeros((mask.shape[0], 1), mask.dtype), mask], axis=1)
    return out


class TrtRunner:
    """Runs a TensorRT engine with Polygraphy, Polygraphy-style: ``activate()`` → ``infer(feed)`` → ``close()``.

    Inputs are numpy arrays (:meth:`infer`) or torch tensors on any device (:meth:`infer_torch`, outputs stay on
    the GPU). The optimization profile is picked by name, by index, or automatically as the first whose ranges
    hold every input shape. ``inference_time`` is the wall time in seconds of the last call. The sidecar is
    checked against this machine on activation.
    """

    def __init__(self, engine_path: str | Path, *, check_env: bool = True) -> None:
        self.engine_path = Path(engine_path)
        self.check_env = check_env
        self.inference_time: float | None = None
        self._runner: Any = None
        self._engine: Any = None
        self._profile: int | None = None
        self._profile_names: list[str] = []

    # -- lifecycle -----------------------------------------------------------------------------------
    @property
    def is_active(self) -> bool:
        return self._runner is not None

    def activate(self) -> TrtRunner:
        """Load the engine onto the GPU (checking the sidecar first)."""
        if self.is_active:
            return self
        trt = import_tensorrt()
        require_cuda()
        polygraphy_logging()
        from polygraphy.backend.trt import EngineFromBytes
        from polygraphy.backend.trt import TrtRunner as PolygraphyTrtRunner
        from polygraphy.exception import PolygraphyException

        if sidecar_path(self.engine_path).is_file():
            sidecar = read_sidecar(self.engine_path)
            self._profile_names = [p.split("=", 1)[0] for p in sidecar.profiles]
            if self.check_env:
                check_engine_compatible(sidecar, current_env(trt))
        else:
            log.warning("%s has no sidecar: cannot check it was built for this GPU/TensorRT", self.engine_path.name)
        try:
            engine = EngineFromBytes(self.engine_path.read_bytes())()
            runner = PolygraphyTrtRunner(engine, name=self.engine_path.stem)
            runner.activate()
        except PolygraphyException as exc:
            raise EngineIncompatibleError(f"TensorRT could not load {self.engine_path.name} ({exc}; built for another "
                                          f"TensorRT version or GPU?); rebuild it here with skipit export … --trt") from None
        self._engine, self._runner, self._profile = engine, runner, None
        return self

    def close(self) -> None:
        """Free the execution context and engine."""
        if self._runner is not None:
            self._runner.deactivate()
        self._runner = self._engine = None
        self._profile = None

    def __enter__(self) -> TrtRunner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metadata ------------------------------------------------------------------------------------
    def _names(self, mode_name: str) -> list[str]:
        trt = import_tensorrt()
        mode = getattr(trt.TensorIOMode, mode_name)
        names = (self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors))
        return [n for n in names if self._engine.get_tensor_mode(n) == mode]

    @property
    def input_names(self) -> list[str]:
        self._require_active()
        return self._names("INPUT")

    @property
    def output_names(self) -> list[str]:
        self._require_active()
        return self._names("OUTPUT")

    def get_input_metadata(self, use_numpy_dtypes: bool = False) -> Any:
        """Polygraphy's ``TensorMetadata`` of the inputs (name → dtype, shape), as Polygraphy's runner gives it."""
        self._require_active()
        return self._runner.get_input_metadata(use_numpy_dtypes=use_numpy_dtypes)

    def _require_active(self) -> None:
        if not self.is_active:
            raise ExportError("TrtRunner is not active: call activate() (or use it as a context manager)")

    def _torch_dtype(self, name: str) -> "torch.dtype":
        from polygraphy.datatype import DataType

        return DataType.to_dtype(DataType.from_dtype(self._engine.get_tensor_dtype(name), source_module="tensorrt"),
                                 "torch")

    # -- profiles ------------------------------------------------------------------------------------
    def _pick_profile(self, shapes: Mapping[str, tuple[int, ...]], profile: str | int | None) -> int:
        if isinstance(profile, int):
            return profile
        if isinstance(profile, str):
            if profile not in self._profile_names:
                raise InvalidOptionError(f"engine has no profile {profile!r}; it has {self._profile_names}")
            return self._profile_names.index(profile)
        for index in range(self._engine.num_optimization_profiles):
            if all(self._fits(name, shape, index) for name, shape in shapes.items()):
                return index
        raise InvalidOptionError(
            f"no optimization profile of {self.engine_path.name} holds the input shapes "
            f"{dict(shapes)} (profiles: {self._profile_names or self._engine.num_optimization_profiles}); "
            f"an empty KV cache must be fed as a masked dummy slot (with_dummy_past), or rebuild with wider "
            f"--profiles")

    def _fits(self, name: str, shape: tuple[int, ...], index: int) -> bool:
        lo, _, hi = self._engine.get_tensor_profile_shape(name, index)
        return len(lo) == len(shape) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))

    # -- inference -----------------------------------------------------------------------------------
    def infer_torch(self, feed: Mapping[str, "torch.Tensor"], profile: str | int | None = None
                    ) -> dict[str, "torch.Tensor"]:
        """Run on torch tensors (any device); outputs stay on the GPU (copies: valid after the next call)."""
        import torch
        from polygraphy.exception import PolygraphyException

        self._require_active()
        expected = self.input_names
        if sorted(feed) != sorted(expected):
            raise InvalidOptionError(f"feed has inputs {sorted(feed)}, the engine wants {sorted(expected)}")
        index = self._pick_profile({n: tuple(t.shape) for n, t in feed.items()}, profile)
        device = torch.device("cuda", torch.cuda.current_device())
        inputs = {n: feed[n].to(device=device, dtype=self._torch_dtype(n)).contiguous() for n in expected}
        torch.cuda.current_stream(device).synchronize()  # Polygraphy runs on its own stream
        try:
            if index != self._profile:
                self._runner.set_profile(index)
                self._profile = index
            out = self._runner.infer(inputs, check_inputs=False, copy_outputs_to_host=False)
        except PolygraphyException as exc:
            raise ExportError(f"TensorRT failed to run {self.engine_path.name} with profile {index}: {exc}") from None
        self.inference_time = self._runner.last_inference_time()
        return {n: t.clone() for n, t in out.items()}  # Polygraphy reuses its output buffers

    def infer(self, feed: Mapping[str, "np.ndarray"], profile: str | int | None = None) -> dict[str, "np.ndarray"]:
        """Run on numpy arrays; returns numpy arrays (bf16 outputs as float32)."""
        import numpy as np
        import torch

        tensors = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in feed.items()}
        out = self.infer_torch(tensors, profile)
        return {n: (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy() for n, t in out.items()}


class TrtDecoderRunner(MergedDecoder):
    """A merged decoder engine fed step by step (:class:`~skipit.runtime.decoder.MergedDecoder`).

    ``runner`` is a :class:`TrtRunner` or any Polygraphy-style runner of the same graph (``activate``,
    ``get_input_metadata``, ``infer(feed) → dict``: Polygraphy's ``OnnxrtRunner`` runs it on a CPU). The prompt
    goes in with one masked zero slot as its past (TensorRT profiles need every dimension ≥ 1); the slot stays
    in the cache, masked, for every following step, which gives the same logits as an empty past.
    """

    def __init__(self, runner: Any) -> None:
        import numpy as np

        if not runner.is_active:
            runner.activate()
        self.runner = runner
        meta = runner.get_input_metadata(use_numpy_dtypes=False)
        self.input_names = list(meta)
        layers = kv_layers(self.input_names)
        if layers != list(range(len(layers))) or "input_ids" not in meta or not layers:
            raise ExportError(f"the engine is not a merged decoder graph with KV cache (inputs: {self.input_names[:6]}…)")
        self.num_layers = len(layers)
        kv = meta["past_key_values.0.key"]
        self.kv_heads, self.head_dim = int(kv.shape[1]), int(kv.shape[3])
        self.kv_dtype = str(np.dtype(kv.dtype.numpy()))

    def _run(self, output_names: list[str], feed: dict[str, "np.ndarray"]) -> list["np.ndarray"]:
        out = self.runner.infer(feed)
        return [out[n] for n in output_names]

    def prompt_past(self, batch: int) -> KV:
        """One zero slot per layer: the prompt's past (masked out by a leading 0 in the attention mask)."""
        import numpy as np

        shape = (batch, self.kv_heads, 1, self.head_dim)
        return [(np.zeros(shape, self.kv_dtype), np.zeros(shape, self.kv_dtype)) for _ in range(self.num_layers)]


class TrtTimedRunner(HostTimedRunner):
    """A merged decoder engine as a :class:`~skipit.runtime.base.Runner` for the speed measurement (Polygraphy
    returns outputs on the host, so the host clock times it)."""

    def __init__(self, engine_path: str | Path, name: str = "trt", vocab_size: int = 0) -> None:
        super().__init__(TrtDecoderRunner(TrtRunner(engine_path)), name, "cuda", vocab_size)
