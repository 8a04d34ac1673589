"""The CI gate behind ``skipit validate ORIGINAL SLIM``: parity (and optionally ONNX parity and speed)
checked against bounds, with a distinct exit code per kind of failure.

Exit codes (:attr:`ValidationReport.exit_code`):

====  ==========================================================================================
0     every check passed
4     parity failed: KL(original ‖ slim) above ``--max-kl``, top-1 agreement below ``--min-top1``, or an
      ``--lm-eval`` task's accuracy dropped by more than ``--max-acc-drop``
5     speed failed: the slim model is not ``--min-speedup`` times faster than the original (torch)
6     export mismatch: the ONNX graph (``--onnx``) disagrees with the slim torch model
2     bad input or option (raised as :class:`~skipit.errors.SkipitError`, as everywhere in skipit)
====  ==========================================================================================

When several kinds fail, the code of the most serious one wins: parity (4), then export (6), then
speed (5).

Before anything is measured the inputs must fit together: the slim model predicts over the original's
vocabulary (else exit 2), the slim folder's own tokenizer/processor encodes every evaluation sample
exactly as the original's does and maps every token to the same id (else
:class:`~skipit.errors.TokenizerMismatchError`, exit 6), and an ``--onnx`` graph's logits have the slim
model's vocabulary (else :class:`~skipit.errors.ExportMismatchError`, exit 6).

Data: ``--data FILE.jsonl`` or, without it, the data the slim model was certified on (read from the
``skipit_manifest.json`` beside the slim ``model/`` directory; skipit's built-in data when there is no
manifest), and its ``test`` split by default — the part that played no role in choosing or
certifying the layers. Without ``--max-kl`` the bound is the one the slim model was certified for
(manifest), if any. By default a bound is checked against the *conservative* end of the 95 %
interval (upper for KL and accuracy drop, lower for agreement); ``conservative=False`` compares point
estimates.

``--lm-eval TASKS`` (:mod:`skipit.validators.lm_eval`) also runs lm-eval tasks on both models; the tasks
are checked to load before the models are.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from skipit.compressor.loading import LoadOptions
from skipit.compressor.manifest import MANIFEST_NAME, Manifest
from skipit.errors import (
    ExitCode,
    InvalidOptionError,
)
from skipit.validators.backend import BackendParity, BackendParityConfig
from skipit.validators.identity import check_onnx_vocabulary, check_same_encoding, check_same_vocabulary
from skipit.validators.lm_eval import LmEvalConfig, LmEvalReport
from skipit.validators.parity import ParityConfig, ParityReport
from skipit.validators.speed import SpeedConfig, SpeedResult

log = logging.getLogger(__name__)

EXIT_PASS, EXIT_PARITY, EXIT_SPEED, EXIT_EXPORT = ExitCode.OK, ExitCode.PARITY, ExitCode.SPEED, ExitCode.EXPORT_MISMATCH
#: kind of check → exit code, in order of precedence
EXIT_CODES = {"parity": EXIT_PARITY, "export": EXIT_EXPORT, "speed": EXIT_SPEED}
Progress = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class GateConfig:
    """What ``skipit validate`` checks and on which data.

    Attributes:
        data: JSONL evaluation data; None: the data recorded in the slim model's manifest (or built-in).
        split: ``test`` (default), ``holdout``, ``calibration`` or ``all``.
        limit: use at most this many samples of the file (before splitting, as ``--calib-limit``).
        max_kl: bound on mean KL(original ‖ slim), nats/token; None: the certified bound, if any.
        min_top1: lower bound on top-1 agreement.
        min_speedup: lower bound on slim-vs-original speedup (torch, prefill at the longest length
            and decode); None: speed is not measured.
        onnx: exported ONNX model (directory or file) to compare with the slim torch model.
        conservative: compare the conservative end of each interval with its bound (default), not the mean.
        lm_eval: lm-eval tasks to run on both models (and ``max_acc_drop``, their bound); None: none.
        revision / cache_dir: for an original given as a Hub id (:func:`~skipit.compressor.hub.resolve_model`).
    """

    data: Path | None = None
    split: str = "test"
    limit: int | None = None
    max_kl: float | None = None
    min_top1: float | None = None
    min_speedup: float | None = None
    onnx: Path | None = None
    conservative: bool = True
    parity: ParityConfig = field(default_factory=ParityConfig)
    backend: BackendParityConfig = field(default_factory=BackendParityConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    load: LoadOptions = field(default_factory=LoadOptions)
    lm_eval: LmEvalConfig | None = None
    revision: str | None = None
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        from skipit.compressor.calibration import SPLITS

        if self.split not in (*SPLITS, "all"):
            raise InvalidOptionError(f"--split {self.split!r} is not one of {', '.join((*SPLITS, 'all'))}")
        if self.max_kl is not None and not (math.isfinite(self.max_kl) and self.max_kl > 0):
            raise InvalidOptionError(f"--max-kl must be a finite number of nats > 0, got {self.max_kl}")
        if self.min_top1 is not None and not 0 <= self.min_top1 <= 1:
            raise InvalidOptionError(f"--min-top1 must be in [0, 1], got {self.min_top1}")
        if self.min_speedup is not None and not (math.isfinite(self.min_speedup) and self.min_speedup > 0):
            raise InvalidOptionError(f"--min-speedup must be > 0 (1.1 = 10 % faster), got {self.min_speedup}")
        if self.limit is not None and self.limit < 6:
            raise InvalidOptionError(f"--limit must be ≥ 6 to leave samples in every split, got {self.limit}")


@dataclass(frozen=True)
class Check:
    """One verdict: ``value`` compared with ``bound`` by ``op`` (``<=`` or ``>=``)."""

    name: str
    kind: str
    value: float
    bound: float
    op: str
    passed: bool
    note: str = ""

    @classmethod
    def of(cls, name: str, kind: str, value: float, bound: float, op: str, note: str = "") -> "Check":
        passed = value <= bound if op == "<=" else value >= bound
        return cls(name, kind, float(value), float(bound), op, bool(passed), note)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "value": self.value, "bound": self.bound, "op": self.op,
                "passed": self.passed, "note": self.note}


@dataclass
class ValidationReport:
    """Everything ``validate`` measured and decided; see the module docstring for ``exit_code``."""

    original: str
    slim: str
    data: dict[str, Any]
    parity: ParityReport
    checks: list[Check]
    removed: list[int] | None = None
    onnx: BackendParity | None = None
    speed: SpeedResult | None = None
    lm_eval: LmEvalReport | None = None

    @property
    def failed_kinds(self) -> list[str]:
        return [kind for kind in EXIT_CODES if any(c.kind == kind and not c.passed for c in self.checks)]

    @property
    def exit_code(self) -> int:
        failed = self.failed_kinds
        return EXIT_CODES[failed[0]] if failed else EXIT_PASS

    @property
    def passed(self) -> bool:
        return self.exit_code == EXIT_PASS

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": "skipit-validation/1", "passed": self.passed, "exit_code": self.exit_code,
            "failed": self.failed_kinds, "original": self.original, "slim": self.slim, "removed": self.removed,
            "data": self.data, "checks": [c.as_dict() for c in self.checks], "parity": self.parity.as_dict(),
            "onnx": self.onnx.as_dict() if self.onnx else None, "speed": self.speed.as_dict() if self.speed else None,
            "lm_eval": self.lm_eval.as_dict() if self.lm_eval else None,
        }

    def summary(self) -> str:
        """One screen of plain text: verdict, the measured numbers with intervals, every check."""
        from skipit.validators.summary import render_summary

        return render_summary(self)


def final_path(path: str | Path) -> str:
    """``path`` with skipit-compress's staging folder (``.OUT.skipit-tmp-XXXX``, see :class:`skipit.atomic.OutputDir`)
    named as the ``OUT`` it becomes when the run commits: ``--validate`` validates the staged output, and its
    report (``report.json``, the printed summary) must name the paths that exist afterwards."""
    from skipit.atomic import TMP_TAG

    parts = [p[1:].split(TMP_TAG)[0] if p.startswith(".") and TMP_TAG in p else p for p in Path(path).parts]
    return str(Path(*parts)) if parts else str(path)


def _slim_dirs(slim_path: Path) -> tuple[Path, Path | None]:
    """(model dir, manifest file or None): accepts skipit's output dir or its ``model/`` folder."""
    if not (slim_path / "config.json").exists() and (slim_path / "model" / "config.json").exists():
        slim_path = slim_path / "model"
    manifest = slim_path.parent / MANIFEST_NAME
    return slim_path, manifest if manifest.is_file() else None


@dataclass(frozen=True)
class Certified:
    """What ``skipit-compress --validate`` hands the gate in memory instead of the gate reading it back: the
    manifest just built (the certified bound, the removed layers, the longest certified context) and the
    calibration set with its splits as certification drew them (``CalibrationSet``)."""

    manifest: Manifest
    data: Any


def _split_info(data: Any, config: GateConfig, same: bool | None) -> tuple[list[Any], dict[str, Any]]:
    samples = data.samples if config.split == "all" else data.split(config.split)
    info = {"source": data.source, "description": data.description, "split": config.split, "samples": len(samples),
            "matches_manifest": same}
    return samples, info


def _data(config: GateConfig, manifest: Manifest | None, with_images: bool) -> tuple[list[Any], dict[str, Any]]:
    """The evaluation samples and a JSON-able description of where they came from."""
    from skipit.compressor.calibration import load_calibration

    recorded = manifest.calibration if manifest else {}
    path, limit = config.data, config.limit
    if path is None and recorded:
        source = recorded.get("source", "builtin")
        if source != "builtin":
            if Path(source).is_file():
                path = Path(source)
            else:
                log.warning("the slim model was certified on %s, which is not here; using the built-in data", source)
        if limit is None:  # the certificate may have used --calib-limit: draw the same subset
            limit = recorded.get("samples")
    data = load_calibration(path, with_images=with_images, limit=limit)
    same = bool(recorded) and data.restore_splits(recorded)
    if recorded and not same and config.data is None:
        log.warning("the evaluation data differs from the data in the manifest: its %s split may overlap the "
                    "samples the layers were chosen on", config.split)
    return _split_info(data, config, same if recorded else None)


def _parity_checks(parity: ParityReport, config: GateConfig, certified: float | None) -> list[Check]:
    logits, cons, conf = parity.logits, config.conservative, f"{config.parity.confidence:.0%}"
    checks = []
    max_kl = config.max_kl if config.max_kl is not None else certified
    if max_kl is not None:
        note = "" if config.max_kl is not None else "bound from the slim model's certificate"
        value = logits.kl.hi if cons else logits.kl.mean
        checks.append(Check.of("kl" + (f" (upper {conf} bound)" if cons else ""), "parity", value, max_kl, "<=", note))
    if config.min_top1 is not None:
        value = logits.top1.lo if cons else logits.top1.mean
        checks.append(Check.of("top1" + (f" (lower {conf} bound)" if cons else ""), "parity", value, config.min_top1, ">="))
    return checks


def _lm_eval_checks(report: LmEvalReport, config: GateConfig) -> list[Check]:
    bound = config.lm_eval.max_acc_drop if config.lm_eval else None
    if bound is None:
        return []
    cons, conf = config.conservative, f"{config.lm_eval.confidence:.0%}" if config.lm_eval else ""
    return [Check.of(f"{t.task} {t.metric} drop" + (f" (upper {conf} bound)" if cons else ""), "parity", t.drop(cons), bound,
                     "<=", f"{t.original.mean:.3f} → {t.slim.mean:.3f} on {t.items} items, {t.changed} scored differently")
            for t in report.tasks]


def _export_checks(onnx: BackendParity, config: GateConfig) -> list[Check]:
    return [
        Check.of("onnx max |Δlogit|", "export", onnx.logits.max_abs, config.backend.atol, "<=",
                 f"mean {onnx.logits.mean_abs:.3g}, p99 {onnx.logits.p99_abs:.3g}; {onnx.describe()}"),
        Check.of("onnx greedy token match", "export", onnx.generation.token_match, 1.0, ">=", onnx.describe()),
    ]


def _speed_checks(speed: SpeedResult, config: GateConfig) -> list[Check]:
    bound = config.min_speedup
    if bound is None:
        return []
    slim = speed.runners["slim"]
    longest = max(speed.seq_lens)
    checks = [Check.of(f"prefill speedup @{longest} tokens", "speed", slim.prefill_speedup[longest],
                       bound, ">=", "torch slim vs torch original, medians")]
    if slim.decode_speedup is not None:
        checks.append(Check.of("decode speedup", "speed", slim.decode_speedup, bound, ">=",
                               f"{speed.decode_tokens} tokens"))
    return checks


def _measure_speed(original: Any, slim: Any, config: GateConfig) -> SpeedResult:
    from dataclasses import asdict

    from skipit.runtime.ort import OrtRunner
    from skipit.runtime.torch_runner import TorchRunner
    from skipit.validators.backend import find_onnx
    from skipit.validators.speed import measure_speed

    runners: dict[str, Any] = {"original": TorchRunner(original, "original"), "slim": TorchRunner(slim, "slim")}
    if config.onnx is not None:
        runners["ort_slim"] = OrtRunner(find_onnx(config.onnx), "ort_slim", device=config.backend.device)
    return measure_speed(runners, baseline="original", **asdict(config.speed))


def _context_check(samples: Sequence[Any], processor: Any, config: GateConfig,
                   manifest: Manifest | None) -> dict[str, Any]:
    """The longest evaluation sample (tokens, after ``max_length``) against the longest context the
    certificate covers; a warning when the data goes beyond it."""
    tokenizer = getattr(processor, "tokenizer", processor)
    lengths = [min(len(tokenizer(s.text)["input_ids"]), config.parity.max_length) for s in samples]
    longest = max(lengths, default=0)
    covered = manifest.longest_context if manifest else None
    beyond = sum(n > covered for n in lengths) if covered else 0
    if beyond:
        log.warning("%d of %d evaluation samples are longer (up to %d tokens) than the longest context the "
                    "certificate covers (%d tokens): the certified bound says nothing about those positions",
                    beyond, len(lengths), longest, covered)
    return {"longest_tokens": longest, "certified_context": covered, "beyond_certified_context": beyond}


def validate(original_path: str | Path, slim_path: str | Path, config: GateConfig = GateConfig(),
             progress: Progress | None = None, certified: Certified | None = None) -> ValidationReport:
    """Check ``slim_path`` against ``original_path``; see the module docstring. Never raises on a failed
    check (that is ``report.exit_code``); raises :class:`~skipit.errors.SkipitError` on bad input.

    ``certified`` (from ``skipit-compress --validate``): the manifest and calibration set in memory, used
    instead of the manifest beside ``slim_path`` and ``config.data`` / ``config.limit``."""
    from skipit.compressor.arch import decoder_spec
    from skipit.compressor.hub import resolve_model
    from skipit.compressor.loading import load_model
    from skipit.validators.backend import backend_parity
    from skipit.validators.parity import check_parity

    emit = progress or (lambda kind, info: None)
    tasks = None
    if config.lm_eval is not None:  # a missing lm-eval, an unknown task or an unreachable data set: before loading
        from skipit.validators.lm_eval import prepare_tasks

        emit("stage", {"name": f"loading lm-eval tasks {', '.join(config.lm_eval.tasks)}"})
        tasks = prepare_tasks(config.lm_eval)
    slim_dir, manifest_path = _slim_dirs(Path(slim_path))
    if certified is not None:
        manifest: Manifest | None = certified.manifest
    else:
        manifest = Manifest.read(manifest_path.parent) if manifest_path else None
    removed = manifest.removed if manifest else None
    certified_kl = manifest.max_kl if manifest else None
    emit("stage", {"name": f"loading {original_path} and {slim_dir}"})
    source = resolve_model(original_path, revision=config.revision, cache_dir=config.cache_dir,
                           allow_pickle=config.load.allow_pickle, trust_remote_code=config.load.trust_remote_code)
    original, slim = load_model(source.path, config.load), load_model(slim_dir, config.load)
    check_same_vocabulary(original, slim)
    if config.onnx is not None:
        check_onnx_vocabulary(Path(config.onnx), slim)
    if certified is not None:
        samples, data_info = _split_info(certified.data, config, True)
    else:
        samples, data_info = _data(config, manifest, decoder_spec(original.model).is_vlm)
    data_info.update(_context_check(samples, original.processor, config, manifest))
    emit("stage", {"name": f"checking that {slim_dir}'s tokenizer encodes the data as the original's does"})
    check_same_encoding(original, slim, samples, config.parity)
    emit("stage", {"name": f"parity on the {config.split} split ({len(samples)} samples)"})
    # The slim processor encodes `samples` exactly as the original's (checked above): one encoding serves both.
    parity = check_parity(original.model, slim.model, samples, slim.processor, config.parity, emit,
                          label=config.split, removed=removed or ())
    checks = _parity_checks(parity, config, certified_kl)
    onnx = speed = None
    if config.onnx is not None:
        emit("stage", {"name": f"ONNX Runtime vs torch on {config.onnx}"})
        onnx = backend_parity(slim.model, slim.processor, samples, config.onnx, config.backend)  # the slim's own
        onnx.onnx_path = final_path(onnx.onnx_path)
        checks += _export_checks(onnx, config)
    if config.min_speedup is not None:
        emit("stage", {"name": "measuring speed (runners interleaved)"})
        speed = _measure_speed(original.model, slim.model, config)
        checks += _speed_checks(speed, config)
    accuracy = None
    if tasks is not None and config.lm_eval is not None:
        from skipit.validators.lm_eval import compare_accuracy

        accuracy = compare_accuracy(original, slim, tasks, config.lm_eval, emit)
        checks += _lm_eval_checks(accuracy, config)
    report = ValidationReport(str(original_path), final_path(slim_dir), data_info, parity, checks, removed, onnx, speed,
                              accuracy)
    log.info("validation %s (exit code %d)", "passed" if report.passed else "failed", report.exit_code)
    return report
