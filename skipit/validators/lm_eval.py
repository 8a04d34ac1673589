"""Accuracy on standard tasks, the way the field measures it: lm-eval (0.4.x) on both models, paired.

``skipit validate ORIGINAL SLIM --lm-eval TASKS`` runs `lm-eval <https://github.com/EleutherAI/lm-evaluation-harness>`_
through its Python API (``lm_eval.simple_evaluate`` with its Hugging Face model class ``HFLM``) on the
original and on the slim model, keeps lm-eval's per-item scores (``log_samples``), pairs them by item and
reports, per task, each model's accuracy and the difference slim − original with a *paired* bootstrap
interval (both models resampled over the same items). ``--max-acc-drop`` bounds the drop; the gate
compares the conservative end of the interval with it (see :mod:`skipit.validators.gate`).

The models are the ones skipit loaded (:func:`~skipit.compressor.loading.load_model`), handed to lm-eval
as objects, so a GGUF original works as well as a checkpoint folder.

``TASKS`` is a comma-separated list of

* skipit's own tasks (:data:`BUILTIN_TASKS`, shipped in ``skipit/validators/tasks/`` with their data:
  ``skipit_facts``, 52 four-way multiple-choice questions on simple English facts and common sense);
* lm-eval task, group or tag names (``hellaswag``, ``arc_easy`` …; their data sets come from the
  Hugging Face Hub, so they need network access or a warm ``HF_DATASETS_CACHE``);
* a task YAML file, or a folder of task YAMLs (every task in it), lm-eval's own format.

lm-eval is an optional dependency: ``pip install 'skipit[eval]'``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from skipit.compressor.stats import Estimate, bootstrap_ratio
from skipit.errors import BackendUnavailableError, InvalidOptionError, SkipitError
from skipit.validators.tasks import TASKS_DIR

log = logging.getLogger(__name__)

PIP_LINE = "pip install 'skipit[eval]'"
#: metrics tried in this order when the config names none that a task reports per item
FALLBACK_METRICS = ("acc", "exact_match", "acc_norm")
Event = Callable[[str, dict[str, Any]], None]


#: names of the tasks skipit ships (one folder each under ``skipit/validators/tasks/``)
BUILTIN_TASKS = ("skipit_facts",)


class LmEvalTaskError(SkipitError):
    """An lm-eval task cannot be found or loaded (unknown name, bad YAML, data set out of reach)."""


def require_lm_eval() -> str:
    """The installed lm-eval version; :class:`BackendUnavailableError` (exit 2) naming the pip line if missing."""
    try:
        import lm_eval  # noqa: F401
        from importlib.metadata import version

        found = version("lm-eval")
    except ImportError:
        raise BackendUnavailableError(f"--lm-eval needs lm-eval (0.4.x), which is not installed: {PIP_LINE}") from None
    if not found.startswith("0.4."):
        log.warning("lm-eval %s is installed; skipit is tested with 0.4.x (%s)", found, PIP_LINE)
    return found


@dataclass(frozen=True)
class LmEvalConfig:
    """What ``--lm-eval`` runs and how its result is judged.

    Attributes:
        tasks: task names, task YAML files or folders of task YAMLs (see the module docstring).
        limit: evaluate at most this many items per task (lm-eval's ``limit``: the first N); None: all.
        max_acc_drop: bound on original − slim accuracy (0.05 = five points); None: report only.
        metric: the per-item metric compared (``acc`` for multiple choice); when a task does not report
            it, the first of :data:`FALLBACK_METRICS` that it does.
        num_fewshot: few-shot examples per prompt; None: each task's default (0 when it names none).
        batch_size: lm-eval's batch size.
        confidence: two-sided confidence of every interval.
        n_boot / seed: bootstrap draws over items (the same draws for both models: paired).
    """

    tasks: tuple[str, ...]
    limit: int | None = None
    max_acc_drop: float | None = None
    metric: str = "acc"
    num_fewshot: int | None = None
    batch_size: int = 8
    confidence: float = 0.95
    n_boot: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        tasks = tuple(t.strip() for t in self.tasks if t and t.strip())
        if not tasks:
            raise InvalidOptionError(f"--lm-eval needs at least one task, e.g. --lm-eval {BUILTIN_TASKS[0]}")
        object.__setattr__(self, "tasks", tasks)
        if self.limit is not None and self.limit < 2:
            raise InvalidOptionError(f"--lm-eval-limit must be ≥ 2 items per task, got {self.limit}")
        if self.max_acc_drop is not None and not 0 <= self.max_acc_drop <= 1:
            raise InvalidOptionError(f"--max-acc-drop is a fraction of items in [0, 1] (0.05 = five points), "
                                     f"got {self.max_acc_drop}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise InvalidOptionError(f"--lm-eval-fewshot must be ≥ 0, got {self.num_fewshot}")
        if self.batch_size < 1:
            raise InvalidOptionError(f"batch size must be ≥ 1, got {self.batch_size}")
        if not 0.5 <= self.confidence < 1:
            raise InvalidOptionError(f"confidence must be in [0.5, 1), got {self.confidence}")
        if self.n_boot < 100:
            raise InvalidOptionError(f"n_boot must be ≥ 100 bootstrap draws, got {self.n_boot}")

    @classmethod
    def parse(cls, tasks: str, **kwargs: Any) -> "LmEvalConfig":
        """From the comma-separated ``--lm-eval`` value."""
        return cls(tuple(tasks.split(",")), **kwargs)


@dataclass(frozen=True)
class TaskSelection:
    """``--lm-eval`` resolved: what lm-eval loads and from where.

    Attributes:
        specs: task names or absolute task YAML paths (``str``) handed to lm-eval, and folders (``Path``)
            whose tasks are all run.
        include_paths: folders lm-eval scans for task YAMLs (skipit's own, then the user's folders).
        include_defaults: whether lm-eval's ~15,000 built-in tasks are indexed too (slow: ~25 s); only
            when a name is not one of skipit's tasks.
    """

    specs: tuple[str | Path, ...]
    include_paths: tuple[Path, ...]
    include_defaults: bool

    def task_manager(self) -> Any:
        from lm_eval.tasks import TaskManager

        with _quiet_lm_eval():
            return TaskManager(include_path=[str(p) for p in self.include_paths], include_defaults=self.include_defaults)


def _task_yamls(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.y*ml") if p.suffix in (".yaml", ".yml"))


def select_tasks(tasks: Sequence[str]) -> TaskSelection:
    """Resolve ``--lm-eval`` entries: a task YAML file is passed as its path, a folder is scanned (each of
    its tasks is run), a name is looked up among skipit's tasks, then among lm-eval's."""
    specs: list[str | Path] = []
    folders: list[Path] = []
    defaults = False
    for task in tasks:
        path = Path(task).expanduser()
        if path.is_dir():
            if not _task_yamls(path):
                raise InvalidOptionError(f"--lm-eval {task}: the folder holds no task YAML (*.yaml); give a folder of "
                                         "lm-eval task YAMLs, a task YAML or a task name")
            folders.append(path.resolve())
            specs.append(path.resolve())  # expanded to its task names by prepare_tasks
        elif path.is_file():
            if path.suffix not in (".yaml", ".yml"):
                raise InvalidOptionError(f"--lm-eval {task} is a file but not a task YAML (.yaml); give an lm-eval task "
                                         "YAML, a folder of them or a task name")
            specs.append(str(path.resolve()))
        else:
            if task not in BUILTIN_TASKS:
                defaults = True
            specs.append(task)
    return TaskSelection(tuple(dict.fromkeys(specs)), (TASKS_DIR, *folders), defaults)


@dataclass
class PreparedTasks:
    """Tasks checked to load (names known, data reachable) before any model is loaded."""

    selection: TaskSelection
    names: tuple[str, ...]
    manager: Any = field(repr=False)
    lm_eval_version: str = ""


def _expand(spec: str | Path, manager: Any) -> list[str]:
    """A folder → the names of the leaf tasks whose YAML lies in it; a name or YAML path unchanged."""
    if isinstance(spec, str):
        return [spec]
    from lm_eval.tasks._index import Kind

    folder = spec
    names = [name for name, entry in manager.task_index.items()
             if entry.kind in (Kind.TASK, Kind.PY_TASK) and entry.yaml_path is not None
             and Path(entry.yaml_path).resolve().is_relative_to(folder)]
    if not names:
        raise LmEvalTaskError(f"--lm-eval {folder}: lm-eval found no task in its YAMLs (each needs a `task:` key); "
                              "see lm-eval's docs/new_task_guide.md")
    return sorted(names)


def prepare_tasks(config: LmEvalConfig) -> PreparedTasks:
    """Check lm-eval is installed and every task loads (data included), so a typo or an unreachable data set
    fails before the models are loaded. Raises :class:`LmEvalTaskError` (exit 2) saying what to do."""
    version = require_lm_eval()
    selection = select_tasks(config.tasks)
    t0 = time.perf_counter()
    manager = selection.task_manager()
    names = tuple(dict.fromkeys(n for spec in selection.specs for n in _expand(spec, manager)))
    for name in names:
        try:
            with _quiet_lm_eval():
                manager.load([name])
        except KeyError:
            raise LmEvalTaskError(
                f"--lm-eval {name!r} is neither an lm-eval task, group or tag nor a task YAML or folder; skipit ships "
                f"{', '.join(BUILTIN_TASKS)}; `lm-eval ls tasks` lists lm-eval's own") from None
        except Exception as exc:  # noqa: BLE001 - lm-eval and datasets raise anything when a data set is missing
            hub = "" if Path(name).exists() or name in BUILTIN_TASKS else (
                "; lm-eval's tasks download their data sets from the Hugging Face Hub: run once with network access "
                "(and HF_DATASETS_OFFLINE unset) to cache them, or use a local task YAML "
                f"(like {TASKS_DIR / BUILTIN_TASKS[0]})")
            raise LmEvalTaskError(f"lm-eval could not load task {name!r}: {type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}{hub}") from None
    log.info("lm-eval %s: tasks %s ready in %.1f s", version, ", ".join(names), time.perf_counter() - t0)
    return PreparedTasks(selection, names, manager, version)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval's info and warning chatter (about passing a model object, custom data sets …) and its
    request-building progress bar off, unless skipit itself logs at debug level."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    logger = logging.getLogger("lm_eval")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    with contextlib.ExitStack() as stack:
        datasets_utils = _loaded_module("datasets.utils")  # "Generating test split" bars of user tasks' data
        if datasets_utils is not None and not datasets_utils.are_progress_bars_disabled():
            datasets_utils.disable_progress_bars()
            stack.callback(datasets_utils.enable_progress_bars)
        task_module = _loaded_module("lm_eval.api.task")
        if task_module is not None and hasattr(task_module, "tqdm"):  # the one bar HFLM's disable_tqdm misses
            from functools import partial
            from unittest import mock

            stack.enter_context(mock.patch.object(task_module, "tqdm", partial(task_module.tqdm, disable=True)))
        try:
            yield
        finally:
            logger.setLevel(previous)


def _loaded_module(name: str) -> Any:
    import sys

    return sys.modules.get(name)


def _hflm(model: Any, tokenizer: Any, batch_size: int, device: Any = None) -> Any:
    """lm-eval's ``HFLM`` around an already loaded model, without progress bars of its own; ``device``: where
    its inputs go (a model dispatched by accelerate, ``--device auto``, may have offloaded weights first, which
    HFLM would take for the model's device)."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):  # skipit reports progress itself; lm-eval's bars would interleave with it
        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().generate_until(requests, disable_tqdm=True)

    # HFLM sets a pad token on the tokenizer it is given: hand it a copy, skipit's own stays as loaded.
    lm = QuietHFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size, backend="causal")
    if device is not None:
        lm._device = device  # HFLM.device reads it; HFLM itself takes next(model.parameters()).device
    return lm


@dataclass(frozen=True)
class TaskScores:
    """One model's per-item scores on one task: ``scores[doc_id]`` (0/1 for accuracy)."""

    task: str
    metric: str
    scores: dict[int, float]
    reported: float | None  # lm-eval's own aggregate, as a cross-check


def _pick_metric(task: str, sample: dict[str, Any], wanted: str) -> str:
    numeric = [m for m in sample.get("metrics", []) if isinstance(sample.get(m), (int, float, bool))]
    for metric in (wanted, *FALLBACK_METRICS):
        if metric in numeric:
            if metric != wanted:
                log.info("task %s reports no per-item %r; comparing %r", task, wanted, metric)
            return metric
    raise LmEvalTaskError(f"lm-eval task {task} reports no per-item {wanted!r} (it reports {', '.join(numeric) or 'none'}); "
                          "skipit compares per-item accuracy: choose a multiple-choice or exact-match task")


def run_tasks(model: Any, tokenizer: Any, prepared: PreparedTasks, config: LmEvalConfig,
              device: Any = None) -> dict[str, TaskScores]:
    """Run lm-eval on one loaded model; ``{task: TaskScores}`` for every leaf task (groups expanded); ``device``:
    where inputs go (default: the model's)."""
    import lm_eval

    with _quiet_lm_eval():
        lm = _hflm(model, tokenizer, config.batch_size, device)
        # Global random/numpy/torch seeds are left alone (None): the items are lm-eval's first `limit`,
        # and few-shot examples are drawn with lm-eval's fixed few-shot seed.
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(prepared.names), task_manager=prepared.manager, limit=config.limit,
            num_fewshot=config.num_fewshot, batch_size=config.batch_size, log_samples=True, bootstrap_iters=0,
            random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    result: dict[str, TaskScores] = {}
    for task, samples in sorted((out or {}).get("samples", {}).items()):
        if not samples:
            continue
        metric = _pick_metric(task, samples[0], config.metric)
        filters = [s.get("filter", "none") for s in samples]
        keep = "none" if "none" in filters else filters[0]  # one score per item (tasks may apply several filters)
        scores = {int(s["doc_id"]): float(s[metric]) for s in samples if s.get("filter", "none") == keep}
        reported = out.get("results", {}).get(task, {}).get(f"{metric},{keep}")
        result[task] = TaskScores(task, metric, scores, float(reported) if isinstance(reported, (int, float)) else None)
    if not result:
        raise LmEvalTaskError(f"lm-eval returned no per-item results for {', '.join(prepared.names)}; "
                              "is --lm-eval-limit 0 or the task's test split empty?")
    return result


@dataclass(frozen=True)
class TaskAccuracy:
    """One task, both models, paired over the same items.

    Attributes:
        original / slim: each model's mean score with its interval.
        difference: slim − original with a paired interval (negative: the slim model is worse).
    """

    task: str
    metric: str
    items: int
    original: Estimate
    slim: Estimate
    difference: Estimate
    changed: int  # items scored differently by the two models

    def drop(self, conservative: bool = True) -> float:
        """original − slim accuracy: the interval's pessimistic end (``conservative``) or the point estimate."""
        return -(self.difference.lo if conservative else self.difference.mean)

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "metric": self.metric, "items": self.items, "original": self.original.as_dict(),
                "slim": self.slim.as_dict(), "difference": self.difference.as_dict(), "changed": self.changed}


@dataclass
class LmEvalReport:
    """What ``--lm-eval`` measured: one :class:`TaskAccuracy` per task."""

    tasks: list[TaskAccuracy]
    limit: int | None
    num_fewshot: int | None
    confidence: float
    lm_eval_version: str
    seconds: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return {"tasks": [t.as_dict() for t in self.tasks], "limit": self.limit, "num_fewshot": self.num_fewshot,
                "confidence": self.confidence, "lm_eval_version": self.lm_eval_version,
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()}}


def paired_accuracy(original: TaskScores, slim: TaskScores, config: LmEvalConfig) -> TaskAccuracy:
    """Pair two models' per-item scores on one task; intervals from the same bootstrap draws over items."""
    items = sorted(set(original.scores) & set(slim.scores))
    if len(items) != len(original.scores) or len(items) != len(slim.scores):
        log.warning("task %s: the two runs scored different items (%d vs %d); comparing the %d both scored",
                    original.task, len(original.scores), len(slim.scores), len(items))
    if not items:
        raise LmEvalTaskError(f"task {original.task}: the two models were scored on no common item")
    a = np.array([original.scores[i] for i in items])
    b = np.array([slim.scores[i] for i in items])
    est_a, est_b, diff = bootstrap_ratio(np.stack([a, b, b - a], axis=1), np.ones(len(items)),
                                         confidence=config.confidence, n_boot=config.n_boot, seed=config.seed)
    return TaskAccuracy(original.task, original.metric, len(items), est_a, est_b, diff, int((a != b).sum()))


def compare_accuracy(original: Any, slim: Any, prepared: PreparedTasks, config: LmEvalConfig,
                     progress: Event | None = None) -> LmEvalReport:
    """Run the prepared lm-eval tasks on both :class:`~skipit.compressor.loading.LoadedModel` s and pair them."""
    emit = progress or (lambda kind, info: None)
    runs, seconds = {}, {}
    for label, loaded in (("original", original), ("slim", slim)):
        emit("stage", {"name": f"lm-eval {', '.join(prepared.names)} on the {label} model"
                               + (f" (first {config.limit} items)" if config.limit else "")})
        t0 = time.perf_counter()
        device = loaded.input_device if getattr(loaded, "device_map", None) else None  # --device auto
        runs[label] = run_tasks(loaded.model, loaded.tokenizer, prepared, config, device)
        seconds[label] = time.perf_counter() - t0
    tasks = [paired_accuracy(runs["original"][t], runs["slim"][t], config) for t in runs["original"] if t in runs["slim"]]
    for t in tasks:
        log.info("lm-eval %s %s: %.3f → %.3f (Δ %+.3f [%+.3f, %+.3f], %d items)", t.task, t.metric, t.original.mean,
                 t.slim.mean, t.difference.mean, t.difference.lo, t.difference.hi, t.items)
    return LmEvalReport(tasks, config.limit, config.num_fewshot, config.confidence, prepared.lm_eval_version, seconds)
