"""``skipit validate --lm-eval``: lm-eval (its Python API and HF model class) on both models, per-item scores
paired by item, a paired bootstrap interval of the accuracy difference, ``--max-acc-drop`` as a parity check
(exit 4); skipit's own task (a JSONL shipped in the package, no hub), user task YAMLs and folders; a clear
exit 2 when lm-eval is missing; the real SmolLM2 GGUF once (slow)."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from skipit.cli import main as skipit_main
from skipit.compressor.arch import decoder_spec
from skipit.compressor.loading import load_model
from skipit.compressor.rewrite import remove_layers_, save_checkpoint
from skipit.errors import BackendUnavailableError, InvalidOptionError
from skipit.validators.gate import EXIT_PARITY, EXIT_PASS, GateConfig, validate
from skipit.validators.lm_eval import (
    BUILTIN_TASKS,
    LmEvalConfig,
    LmEvalTaskError,
    TaskScores,
    paired_accuracy,
    prepare_tasks,
    select_tasks,
)
from skipit.validators.parity import ParityConfig

ARCH = "LlamaForCausalLM"
FAST_PARITY = ParityConfig(n_boot=200, new_tokens=0, batch_size=4, max_length=48)


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The tiny original, a slim copy (layers 1-3 removed) and a copy with perturbed weights (same vocabulary)."""
    import torch

    root = tmp_path_factory.mktemp("lm-eval")
    original = tiny_model_dir(ARCH)
    slim = load_model(original)
    remove_layers_(slim.model, decoder_spec(slim.model), [1, 2, 3])
    save_checkpoint(slim.model, slim.processor, original, root / "slim")
    other = load_model(original)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * p.std().clamp(min=0.02))
    save_checkpoint(other.model, other.processor, original, root / "other")
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Line {i}: the quick brown fox jumps over lazy dog {i}."})
                              for i in range(12)))
    return {"original": original, "slim": root / "slim", "other": root / "other", "data": data}


def _gate(models: dict[str, Path], **lm_eval) -> GateConfig:
    return GateConfig(data=models["data"], parity=FAST_PARITY, lm_eval=LmEvalConfig(**lm_eval))


def test_shipped_task_is_package_data_with_four_choices() -> None:
    from skipit.validators.tasks import TASKS_DIR

    rows = [json.loads(line) for line in (TASKS_DIR / "skipit_facts" / "facts.jsonl").read_text().splitlines()]
    assert len(rows) >= 50 and len({r["question"] for r in rows}) == len(rows)
    assert all(len(r["choices"]) == 4 and 0 <= r["answer"] < 4 and len(set(r["choices"])) == 4 for r in rows)
    selection = select_tasks(list(BUILTIN_TASKS))
    assert not selection.include_defaults, "skipit's own task must not need lm-eval's 15,000-task index"
    assert select_tasks(["hellaswag"]).include_defaults


def test_identical_models_pass_with_a_zero_width_paired_interval(models) -> None:
    t0 = time.perf_counter()
    report = validate(models["original"], models["original"], _gate(models, tasks=("skipit_facts",), max_acc_drop=0.0))
    (task,) = report.lm_eval.tasks
    print(f"tiny original vs itself: {task.as_dict()} in {time.perf_counter() - t0:.1f} s")
    assert task.task == "skipit_facts" and task.metric == "acc" and task.items == 52 and task.changed == 0
    # paired: the same items in every draw, so the difference of identical models has no spread at all
    assert task.difference.mean == task.difference.lo == task.difference.hi == 0.0
    assert task.original.lo < task.original.mean < task.original.hi or task.original.mean in (0.0, 1.0)
    assert report.exit_code == EXIT_PASS
    (check,) = [c for c in report.checks if "drop" in c.name]
    assert check.kind == "parity" and check.passed and check.bound == 0.0
    assert "lm-eval skipit_facts" in report.summary()
    assert json.loads(json.dumps(report.as_dict()))["lm_eval"]["tasks"][0]["items"] == 52


def test_accuracy_drop_fails_the_gate_with_the_parity_code(models) -> None:
    report = validate(models["original"], models["other"], _gate(models, tasks=("skipit_facts",), limit=40, max_acc_drop=0.0))
    (task,) = report.lm_eval.tasks
    print(f"tiny original vs perturbed: {task.as_dict()}")
    assert task.items == 40 and task.changed > 0
    assert task.difference.lo < 0 <= task.drop()
    assert report.exit_code == EXIT_PARITY and "parity" in report.failed_kinds
    assert not next(c for c in report.checks if "drop" in c.name).passed
    point = validate(models["original"], models["other"], GateConfig(
        data=models["data"], parity=FAST_PARITY, conservative=False,
        lm_eval=LmEvalConfig(("skipit_facts",), limit=40, max_acc_drop=1.0)))
    assert point.exit_code == EXIT_PASS and point.lm_eval.tasks[0].drop(False) == pytest.approx(-task.difference.mean)


def test_paired_interval_is_narrower_than_the_models_own() -> None:
    """Two models that agree on most items: their accuracies vary a lot over resamples, their difference little."""
    rng = np.random.default_rng(0)
    a = (rng.random(200) < 0.6).astype(float)
    b = a.copy()
    b[:10] = 1 - b[:10]
    original = TaskScores("t", "acc", dict(enumerate(a)), None)
    slim = TaskScores("t", "acc", {i: b[i] for i in reversed(range(200))}, None)  # order of items is irrelevant
    acc = paired_accuracy(original, slim, LmEvalConfig(("t",)))
    assert acc.changed == 10 and acc.difference.mean == pytest.approx(b.mean() - a.mean())
    width = acc.difference.hi - acc.difference.lo
    assert width < 0.5 * (acc.original.hi - acc.original.lo)


def test_user_task_yaml_and_folder(models, tmp_path: Path) -> None:
    """A task the way lm-eval users write one: YAML over a local JSONL via the `json` data set builder."""
    rows = [{"q": f"What is {i} plus one?", "options": [str(i + 1), str(i + 7), str(i * 3 + 2), "zero"], "label": 0}
            for i in range(1, 9)]
    (tmp_path / "sums.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    folder = tmp_path / "tasks"
    folder.mkdir()
    for name in ("sums_a", "sums_b"):
        (folder / f"{name}.yaml").write_text(textwrap.dedent(f"""\
            task: {name}
            dataset_path: json
            dataset_kwargs:
              data_files: {{test: {tmp_path / 'sums.jsonl'}}}
              cache_dir: {tmp_path / 'hf-datasets'}
            output_type: multiple_choice
            test_split: test
            doc_to_text: "Question: {{{{q}}}}\\nAnswer:"
            doc_to_choice: "{{{{options}}}}"
            doc_to_target: label
            metric_list:
              - metric: acc
            """))
    report = validate(models["original"], models["slim"],
                      _gate(models, tasks=(str(folder), str(folder / "sums_a.yaml"), "skipit_facts"), limit=5))
    assert [t.task for t in report.lm_eval.tasks] == ["skipit_facts", "sums_a", "sums_b"]
    assert [t.items for t in report.lm_eval.tasks] == [5, 5, 5]
    assert report.exit_code == EXIT_PASS  # no --max-acc-drop: reported, not gated
    assert not [c for c in report.checks if "drop" in c.name]


def test_bad_task_specs_are_exit_2_before_any_model_is_loaded(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    (tmp_path / "notes.txt").write_text("not a task")
    with pytest.raises(InvalidOptionError, match="not a task YAML"):
        validate(missing, missing, GateConfig(lm_eval=LmEvalConfig((str(tmp_path / "notes.txt"),))))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidOptionError, match="no task YAML"):
        validate(missing, missing, GateConfig(lm_eval=LmEvalConfig((str(empty),))))
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"task: broken\ndataset_path: json\ndataset_kwargs:\n  data_files: {{test: {tmp_path / 'nope.jsonl'}}}\n"
                      f"  cache_dir: {tmp_path / 'hf'}\noutput_type: multiple_choice\ntest_split: test\n"
                      "doc_to_text: q\ndoc_to_choice: '{{options}}'\ndoc_to_target: label\n")
    with pytest.raises(LmEvalTaskError, match="could not load task") as err:
        prepare_tasks(LmEvalConfig((str(broken),)))
    assert err.value.exit_code == 2
    with pytest.raises(InvalidOptionError, match="max-acc-drop"):
        LmEvalConfig(("skipit_facts",), max_acc_drop=5)
    with pytest.raises(InvalidOptionError, match="at least one task"):
        LmEvalConfig.parse(" , ")


def test_missing_lm_eval_is_exit_2_with_the_pip_line(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    missing = tmp_path / "no-such-model"
    with pytest.raises(BackendUnavailableError, match=r"pip install 'skipit\[eval\]'") as err:
        validate(missing, missing, GateConfig(lm_eval=LmEvalConfig(("skipit_facts",))))  # before loading models
    assert err.value.exit_code == 2
    assert skipit_main(["validate", str(missing), str(missing), "--lm-eval", "skipit_facts"]) == 2
    assert "skipit[eval]" in capsys.readouterr().err


def test_cli_flags(models, tmp_path: Path, capsys) -> None:
    out = tmp_path / "gate.json"
    code = skipit_main(["validate", str(models["original"]), str(models["slim"]), "--data", str(models["data"]),
                        "--new-tokens", "0", "--lm-eval", "skipit_facts", "--lm-eval-limit", "8",
                        "--max-acc-drop", "1", "--json", str(out)])
    assert code == EXIT_PASS
    saved = json.loads(out.read_text())
    assert saved["lm_eval"]["tasks"][0]["items"] == 8 and saved["lm_eval"]["limit"] == 8
    assert any(c["name"].startswith("skipit_facts acc drop") for c in saved["checks"])
    assert skipit_main(["validate", str(models["original"]), str(models["slim"]), "--max-acc-drop", "0.1"]) == 2
    assert "--lm-eval" in capsys.readouterr().err


@pytest.mark.slow
def test_real_smollm2_gguf_original_and_slim(smollm2_gguf: Path, tmp_path: Path) -> None:
    """The GGUF original goes to lm-eval as skipit's loaded model object; the slim lacks two middle layers."""
    slim = load_model(smollm2_gguf)
    remove_layers_(slim.model, decoder_spec(slim.model), [13, 14])
    save_checkpoint(slim.model, slim.processor, None, tmp_path / "slim")
    del slim
    t0 = time.perf_counter()
    report = validate(smollm2_gguf, tmp_path / "slim", GateConfig(
        limit=12, parity=ParityConfig(n_boot=200, new_tokens=0, batch_size=4, max_length=64),
        lm_eval=LmEvalConfig(("skipit_facts",), limit=30, max_acc_drop=0.5)))
    (task,) = report.lm_eval.tasks
    print(f"SmolLM2 original vs layers 13, 14 removed: {task.as_dict()}; {report.lm_eval.seconds}; "
          f"{time.perf_counter() - t0:.0f} s")
    assert task.items == 30
    assert task.original.mean >= 0.5, "SmolLM2-135M-Instruct should answer most of these simple questions"
    assert report.exit_code == EXIT_PASS
