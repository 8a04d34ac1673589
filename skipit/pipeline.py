"""The whole job in a few readable lines: load → analyze/certify → rewrite → save, atomically."""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from skipit.compressor.analyze import AnalyzeConfig, run_pass
from skipit.compressor.arch import decoder_spec
from skipit.compressor.calibration import DataOptions, load_calibration, read_jsonl
from skipit.compressor.batches import EncodedBatches, count_samples, encode
from skipit.compressor.certify import certify
from skipit.compressor.certificate import Certificate, CertifyPolicy
from skipit.compressor.dtypes import SAVE_DTYPES, cast_weights_, source_dtype
from skipit.compressor.heal import HealConfig, check_trainable
from skipit.compressor.loading import LoadedModel, LoadOptions, load_model
from skipit.compressor.placement import modules_per_device
from skipit.compressor.reference import scratch_folder
from skipit.compressor.manifest import (Manifest, build_manifest, hub_model_card, model_card, size_record,
                                       source_card_metadata, write_manifest)
from skipit.compressor.rewrite import remove_layers_, save_checkpoint, verify_reload
from skipit import extras
from skipit.atomic import OutputDir, write_atomic
from skipit.errors import InvalidOptionError
from skipit.report import write_report

log = logging.getLogger(__name__)

Progress = Callable[[str, dict[str, Any]], None]
#: folder inside the staging folder for a run's spill files (never part of the output)
SCRATCH = ".skipit-scratch"


@dataclass(frozen=True)
class CompressOptions:
    """Everything ``skipit-compress`` can be told, grouped by stage."""

    load: LoadOptions = field(default_factory=LoadOptions)
    data: DataOptions = field(default_factory=DataOptions)
    policy: CertifyPolicy = field(default_factory=CertifyPolicy)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    heal: HealConfig | None = None
    heal_data: Path | None = None
    #: dtype of the saved checkpoint: ``source`` (the input's own; bfloat16 for a quantized GGUF) or a torch name
    save_dtype: str = "source"
    #: a Hub id as MODEL: the revision (branch, tag or commit) and the cache folder (default: HF_HOME's)
    revision: str | None = None
    cache_dir: Path | None = None
    overwrite: bool = False
    export: tuple[str, ...] = ()
    backend: str = "torch"
    exporter: str = "dynamo"
    validate: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.export) - {"onnx", "trt"}
        if unknown:
            raise InvalidOptionError(f"--export {','.join(sorted(unknown))} is not supported; use onnx or onnx,trt")
        if self.save_dtype not in SAVE_DTYPES:
            raise InvalidOptionError(f"--save-dtype {self.save_dtype!r} is not one of {', '.join(SAVE_DTYPES)}")
        if self.heal_data is not None and self.heal is None:
            raise InvalidOptionError("--heal-data gives text for healing: add --heal")
        if self.backend != "torch" and "onnx" not in self.export:
            raise InvalidOptionError(f"--backend {self.backend} chooses the ONNX exporter: add --export onnx")


@dataclass
class CompressResult:
    out_dir: Path
    certificate: Certificate
    manifest: Manifest
    validation: Any = None
    exports: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0, or the validation gate's exit code when ``--validate`` found a failed check."""
        return 0 if self.validation is None else self.validation.exit_code


def resolve_source(model: str | Path, options: CompressOptions) -> Any:
    """MODEL → a :class:`~skipit.compressor.hub.ResolvedModel`: a local path, or a Hub id from the HF cache
    (downloaded unless ``HF_HUB_OFFLINE``; ``options.revision`` / ``options.cache_dir``)."""
    from skipit.compressor.hub import resolve_model

    return resolve_model(str(model), revision=options.revision, cache_dir=options.cache_dir,
                         allow_pickle=options.load.allow_pickle, trust_remote_code=options.load.trust_remote_code)


def output_dir(out_dir: Path, source: Path | None, options: CompressOptions) -> OutputDir:
    """The guarded output folder of a run (:class:`skipit.atomic.OutputDir`; entering it checks and locks).

    ``out_dir`` may not overlap the model, nor be or hold a data file (calibration, healing) or its folder.
    """
    data_files = [p for p in (options.data.path, options.heal_data) if p is not None]
    return OutputDir(out_dir, overwrite=options.overwrite, inputs=[source] if source else [],
                     protect=data_files + [p.parent for p in data_files])


def prepare(model_path: str | Path, options: CompressOptions) -> tuple[LoadedModel, Any, Any]:
    """Load the model, bind its spec and load + split the calibration data."""
    loaded = load_model(model_path, options.load)
    spec = decoder_spec(loaded.model)
    options.policy.check_budget(spec.num_layers)
    d = options.data
    data = load_calibration(d.path, with_images=spec.is_vlm, seed=d.seed, limit=d.limit)
    return loaded, spec, data


def encode_split(loaded: LoadedModel, spec: Any, data: Any, split: str, options: CompressOptions) -> EncodedBatches:
    """One split's batches, encoded batch by batch when read, on the device the model's inputs go to; each
    batch's ``sample_ids`` are indices into ``data.samples`` (the whole set)."""
    d = options.data
    return encode(data.split(split), loaded.processor, spec, batch_size=d.batch_size, max_length=d.max_length,
                  device=loaded.input_device, ids=data.splits[split])


def encode_heal_data(loaded: LoadedModel, spec: Any, options: CompressOptions) -> Sequence[Any]:
    """``--heal-data``: every line of the file, encoded like the calibration data (no split: none is held out)."""
    if options.heal_data is None:
        return []
    d = options.data
    samples = read_jsonl(options.heal_data, with_images=spec.is_vlm)
    return encode(samples, loaded.processor, spec, batch_size=d.batch_size, max_length=d.max_length,
                  device=loaded.input_device)


def compress(model_path: str | Path, out_dir: str | Path, options: CompressOptions = CompressOptions(),
             progress: Progress | None = None) -> CompressResult:
    """Certify, remove and save: the job behind ``skipit-compress MODEL OUT``.

    ``out_dir`` is locked and checked before loading, built in a staging folder beside it and moved
    into place at the end; an existing folder is replaced only with ``overwrite`` and only if skipit
    wrote it. Paths are recorded resolved.
    """
    out_dir = Path(out_dir)
    local = Path(model_path).expanduser()
    if options.data.path is not None:
        options = replace(options, data=replace(options.data, path=Path(options.data.path).resolve()))
    if options.heal_data is not None:
        options = replace(options, heal_data=Path(options.heal_data).resolve())
    gguf = str(model_path).endswith(".gguf")
    stages = _Stages(progress, 5 + gguf + ("onnx" in options.export) + ("trt" in options.export) + options.validate)
    emit = stages.emit
    extras.require(*extras.for_compress(model_path, options))
    with output_dir(out_dir, local.resolve() if local.exists() else None, options) as output, \
            scratch_folder(output.staging / SCRATCH) as scratch:
        # spill files (reference distributions, disk-offloaded weights) lie in the staging folder, on the output's
        # disk, and go with it if the run dies; removed before the output is moved into place
        source = resolve_source(model_path, options)
        model_path = source.path.resolve()
        emit("stage", {"name": f"loading {source.repo_id or model_path}"})
        loaded, spec, data = prepare(model_path, options)
        if options.heal is not None:
            check_trainable(loaded.model)  # before hours of certification, not after
        calibration = encode_split(loaded, spec, data, "calibration", options)
        holdout = encode_split(loaded, spec, data, "holdout", options)
        heal_extra = encode_heal_data(loaded, spec, options)
        emit("stage", {"name": "certifying" + (" (with healing)" if options.heal else "")})
        save_dtype = source_dtype(model_path) if options.save_dtype == "source" else options.save_dtype
        cert = certify(loaded.model, spec, calibration, holdout, options.policy, options.analyze, on_event=emit,
                       healing=options.heal, heal_extra=heal_extra, measure_dtype=save_dtype)
        emit("stage", {"name": f"removing layers {cert.layers} and saving"})
        params_original = sum(p.numel() for p in loaded.model.parameters())
        config_diff = remove_layers_(loaded.model, spec, cert.layers)
        params_slim = sum(p.numel() for p in loaded.model.parameters())
        healed = _healed_tensors(loaded, cert) if loaded.gguf_file and cert.healing else None
        cast_weights_(loaded.model, save_dtype)  # the certificate was measured in this dtype (certify)
        tmp = output.staging
        save_checkpoint(loaded.model, loaded.processor, None if loaded.gguf_file else loaded.model_dir, tmp / "model")
        emit("stage", {"name": "reloading the checkpoint in a fresh process"})
        reload_facts = verify_reload(tmp / "model", loaded.model, spec, calibration[0].inputs)
        manifest = build_manifest(
            source={**source.as_dict(), "path": str(model_path), "gguf_file": loaded.gguf_file,
                    "processor_note": loaded.processor_note, "dtype": source_dtype(model_path), "saved_dtype": save_dtype,
                    **({"placement": placement(loaded)} if loaded.device_map else {})},
            architecture=type(loaded.model).__name__,
            certificate=cert,
            config_diff=config_diff,
            calibration=data.describe(),
            analyze_config=asdict(options.analyze),
            reload_check=reload_facts,
        )
        if loaded.gguf_file:
            manifest.gguf = _export_gguf(loaded.model_dir / loaded.gguf_file, cert.layers, tmp, emit, healed)
        weights = Path(loaded.model_dir) / loaded.gguf_file if loaded.gguf_file else Path(model_path)
        manifest.size = size_record(params_original, params_slim, weights, tmp)
        write_manifest(tmp, manifest)
        record = manifest.as_dict()  # the JSON form: what the cards and the report read, as from disk
        write_atomic(tmp / "README.md", model_card(record))
        write_atomic(tmp / "model" / "README.md", hub_model_card(
            record, pipeline_tag="image-text-to-text" if spec.is_vlm else "text-generation",
            metadata=source_card_metadata(model_path), base_model=source.repo_id))
        exports = _export(tmp, options, emit)
        if options.validate:
            emit("stage", {"name": "validating on the untouched test split"})
        validation = _validate(model_path, tmp, options, emit, manifest, data) if options.validate else None
        emit("stage", {"name": "writing report.md / report.html"})
        write_report(tmp, record, validation=validation.as_dict() if validation else None,
                     speed=validation.speed.as_dict() if validation and validation.speed else None)
        loaded.release()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        output.commit()
    return CompressResult(out_dir, cert, manifest, validation, exports)


def placement(loaded: LoadedModel) -> dict[str, Any]:
    """Where accelerate put the model (``--device auto``): modules per device, and the device map itself."""
    device_map = loaded.device_map or {}
    return {"modules_per_device": modules_per_device(device_map), "device_map": {k: str(v) for k, v in device_map.items()}}


def _healed_tensors(loaded: LoadedModel, cert: Certificate) -> dict[str, Any]:
    """The trained tensors of a healed slim model (original numbering, full precision, before the save cast)."""
    from skipit.exporters.gguf import slim_model_tensors

    tensors = slim_model_tensors(loaded.model, cert.layers, cert.healing["tensors"])  # type: ignore[index]
    return {k: v.detach().clone() for k, v in tensors.items()}


#: below this share of the healing change kept by the source's quantization type, trained tensors go in as Q8_0
MIN_CHANGE_KEPT = 0.5


def _export_gguf(source: Path, removed: list[int], tmp: Path, emit: Progress,
                 healed: dict[str, Any] | None = None) -> dict[str, Any]:
    """GGUF in → ``OUT/model.gguf`` out: the removed blocks dropped, every other byte kept (see exporters.gguf).

    With ``healed`` (trained tensors, original numbering) those tensors are re-quantized to the source's
    type; where that keeps less than :data:`MIN_CHANGE_KEPT` of what healing changed (4-bit steps are
    coarser than a healing update: 6 % kept on SmolLM2 Q4_1), they are written as Q8_0 instead.
    """
    from skipit.errors import ExportError
    from skipit.exporters.gguf import export_gguf

    what = "healed tensors re-quantized" if healed else "quantized tensors copied byte for byte"
    emit("stage", {"name": f"writing model.gguf (blocks {removed} dropped, {what})"})
    out = tmp / "model.gguf"
    try:
        written = export_gguf(source, removed, out, replace=healed).as_dict()
        kept = (written.get("healed") or {}).get("change_kept")
        if kept is not None and kept < MIN_CHANGE_KEPT:
            log.warning("the source's type keeps %.0f %% of the healing change: trained tensors written as Q8_0", 100 * kept)
            written = {**export_gguf(source, removed, out, replace=healed, replace_type="Q8_0").as_dict(),
                       "source_type_change_kept": kept}
    except ExportError as exc:  # e.g. a removal llama.cpp would run as another model: the rest is still valid
        log.warning("model.gguf not written: %s", exc)
        return {"skipped": str(exc)}
    note = ("the certificate was measured on the dequantized model; model.gguf keeps the source's own quantized "
            "tensors for every kept block")
    if healed:
        note += ", except the healed tensors, re-quantized from the healed weights (see healed)"
    return {**written, "note": note}


class _Stages:
    """Numbers the run's ``stage`` events (``step`` of ``of``) so a front end can show overall progress."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def emit(self, kind: str, info: dict[str, Any]) -> None:
        if kind == "stage" and self.done < self.total:
            self.done += 1
            info = {**info, "step": self.done, "of": self.total}
        if self.progress is not None:
            self.progress(kind, info)


def _export(tmp: Path, options: CompressOptions, emit: Progress) -> dict[str, Any]:
    """``--export onnx[,trt]``: graphs into ``tmp/onnx``, engines into ``tmp/engines`` where possible."""
    from skipit.errors import BackendUnavailableError
    from skipit.exporters.export import build_engines, export_onnx
    from skipit.exporters.onnx import OnnxExportConfig

    out: dict[str, Any] = {}
    if not options.export:
        return out
    emit("stage", {"name": "exporting the slim model to ONNX (verified with onnxruntime)"})
    config = OnnxExportConfig(backend=options.backend, exporter=options.exporter)
    out["onnx"] = {k: str(v) for k, v in export_onnx(tmp / "model", tmp / "onnx", config).items()}
    if "trt" in options.export:
        emit("stage", {"name": "building TensorRT engines"})
        try:
            out["engines"] = [str(p) for p in build_engines(tmp / "onnx", tmp / "engines")]
        except BackendUnavailableError as exc:
            log.warning("TensorRT engines skipped: %s", exc)
            out["engines"] = {"skipped": str(exc)}
    return out


def _validate(model_path: str | Path, tmp: Path, options: CompressOptions, emit: Progress, manifest: Manifest,
              data: Any) -> Any:
    """``--validate``: the CI gate on the untouched test split (and ONNX parity when exported), given the
    manifest and the calibration set in memory (:class:`skipit.validators.gate.Certified`)."""
    from skipit.validators.gate import Certified, GateConfig, validate
    from skipit.validators.parity import ParityConfig

    onnx = tmp / "onnx" if "onnx" in options.export else None
    d = options.data
    config = GateConfig(onnx=onnx, load=options.load, parity=ParityConfig(batch_size=d.batch_size, max_length=d.max_length))
    return validate(model_path, tmp, config, progress=emit, certified=Certified(manifest, data))


def analyze_model(model_path: str | Path, options: CompressOptions = CompressOptions(),
                  progress: Progress | None = None, with_oracle: bool = False) -> dict[str, Any]:
    """Scores only (``skipit analyze``): one hooked pass over the calibration split, no rewrite.

    ``with_oracle`` also removes each layer alone and reports how well each score ranks the real
    held-out damage (Spearman), at one pass per layer.
    """
    emit = progress or (lambda kind, info: None)
    loaded, spec, data = prepare(resolve_source(model_path, options).path, options)
    batches = encode_split(loaded, spec, data, "calibration", options)
    emit("pass_start", {"split": "calibration", "removed": [], "samples": count_samples(batches)})
    result = run_pass(loaded.model, spec, batches, config=options.analyze, on_batch=lambda k: emit("batch", {"n": k}))
    combined = result.combined(vision=spec.is_vlm and result.tokens["vision"] > 0)
    report: dict[str, Any] = {}
    if with_oracle:
        from skipit.compressor.oracle import oracle

        holdout = encode_split(loaded, spec, data, "holdout", options)
        emit("pass_start", {"split": "holdout", "removed": ["each layer alone"], "samples": spec.num_layers})
        found = oracle(loaded.model, spec, batches, holdout, config=options.analyze, scores=result,
                       on_pass=lambda layer: emit("batch", {"n": 1}))
        report["oracle"] = found.as_dict()
    return report | {
        "model": str(model_path),
        "architecture": type(loaded.model).__name__,
        "num_layers": spec.num_layers,
        "tokens": result.tokens,
        "analyze_config": asdict(options.analyze),
        "calibration": data.describe(),
        "layers": [ls.as_dict() for ls in result.layers],
        "combined": combined,
        "ranking": sorted(combined, key=combined.__getitem__),
    }
