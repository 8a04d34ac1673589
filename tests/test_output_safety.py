"""Never lose a user's files (issue 9): OUT_DIR that appears during a run, concurrent runs, --overwrite
of folders skipit did not write, an interrupted replacement, SIGTERM, the reload child, stale staging
folders, umask, resolved paths, and options refused before any work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from skipit.atomic import OutputDir
from skipit.cli import main
from skipit.errors import OutputExistsError

LLAMA = "LlamaForCausalLM"
FAST = ("--max-layers", "1", "--calib-limit", "12", "--max-length", "24", "--batch-size", "4", "--probe-width", "1")


def _run(capsys: Any, *argv: Any) -> tuple[int, str]:
    code = main(["compress", *map(str, argv)])
    return code, " ".join(capsys.readouterr().err.split())


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _user_folder(path: Path) -> dict[str, bytes]:
    (path / "sub").mkdir(parents=True)
    (path / "thesis.txt").write_text("four years of work")
    (path / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return _tree(path)


def _leftovers(parent: Path) -> list[str]:
    """skipit's hidden working names beside an output: staging folders, lock files, swapped-out outputs."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and ".skipit-" in p.name)


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> Path:
    return tiny_model_dir(LLAMA)


@pytest.fixture(scope="module")
def previous_output(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real skipit output of the tiny Llama; tests copy it where they need an earlier run's folder."""
    out = tmp_path_factory.mktemp("previous") / "out"
    assert main(["compress", str(model), str(out), *FAST]) == 0
    return out


def _compress(model: Path, out: Path, on_stage: Callable[[str], None], overwrite: bool = False) -> Any:
    """The library pipeline, with a hook that acts like a user while skipit works."""
    from skipit.compressor.certificate import CertifyPolicy
    from skipit.pipeline import CompressOptions, DataOptions, compress

    options = CompressOptions(data=DataOptions(limit=12, batch_size=4, max_length=24),
                              policy=CertifyPolicy(max_kl=None, max_layers=1, probe_width=1), overwrite=overwrite)
    return compress(model, out, options, progress=lambda kind, info: on_stage(info["name"]) if kind == "stage" else None)


# --- data loss -------------------------------------------------------------------------------------
@pytest.mark.parametrize("contents", ["files", "empty"])
def test_out_dir_created_during_the_run_is_never_touched(model: Path, tmp_path: Path, contents: str) -> None:
    out = tmp_path / "out"

    def user(stage: str) -> None:
        if stage == "certifying":
            out.mkdir()
            if contents == "files":
                (out / "notes.txt").write_text("x")

    with pytest.raises(OutputExistsError, match="appeared while skipit was running") as err:
        _compress(model, out, user)
    assert _tree(out) == ({"notes.txt": b"x"} if contents == "files" else {})
    kept = tmp_path / "out.skipit-new"
    assert str(kept) in str(err.value) and (kept / "skipit_manifest.json").is_file() and (kept / "model").is_dir()
    assert _leftovers(tmp_path) == []


def test_two_runs_into_one_out_dir_exactly_one_wins(model: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "out"
    second: list[tuple[int, str]] = []

    def start_another(stage: str) -> None:
        if stage == "certifying":
            second.append(_run(capsys, model, out, *FAST))

    result = _compress(model, out, start_another)
    [(code, err)] = second
    assert code == 2 and f"another skipit run (pid {os.getpid()}) is writing" in err, err
    assert result.out_dir == out and (out / "skipit_manifest.json").is_file()
    assert _leftovers(tmp_path) == []


def test_overwrite_refuses_a_folder_skipit_did_not_write(model: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "mine"
    before = _user_folder(out)
    code, err = _run(capsys, model, out, *FAST, "--overwrite")
    assert code == 2 and "was not written by skipit" in err and "skipit_manifest.json" in err, err
    assert _tree(out) == before
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("target", ["data", "."], ids=["calibration-folder", "its-parent"])
def test_output_may_not_be_or_hold_the_calibration_data(model: Path, tmp_path: Path, capsys: Any, target: str) -> None:
    from PIL import Image

    data = tmp_path / "work" / "data"
    data.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(data / "img.png")
    lines = [json.dumps({"text": f"The sea was calm on day {i} of the voyage."}) for i in range(12)]
    (data / "calib.jsonl").write_text("\n".join(lines) + "\n")
    (data / "skipit_manifest.json").write_text("{}")  # even a folder that looks like skipit's is refused
    before = _tree(tmp_path / "work")
    out = tmp_path / "work" if target == "." else data
    code, err = _run(capsys, model, out, *FAST, "--calib", data / "calib.jsonl", "--overwrite")
    assert code == 2 and "overlaps the input" in err, err
    assert _tree(tmp_path / "work") == before


def test_overwrite_replaces_an_earlier_skipit_output(model: Path, previous_output: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(previous_output, out)
    (out / "stale-extra.txt").write_text("from the earlier run's folder")
    _compress(model, out, lambda stage: None, overwrite=True)
    assert (out / "skipit_manifest.json").is_file() and not (out / "stale-extra.txt").exists()
    assert _leftovers(tmp_path) == []


def test_a_swap_killed_between_its_renames_is_restored(model: Path, previous_output: Path, tmp_path: Path,
                                                       capsys: Any) -> None:
    """A kill after OUT was hidden as .OUT.skipit-old and before the new one was moved in."""
    out, hidden = tmp_path / "out", tmp_path / ".out.skipit-old"
    shutil.copytree(previous_output, hidden)
    before = _tree(hidden)
    code, err = _run(capsys, model, out, *FAST)  # no --overwrite: restores, then refuses the existing folder
    assert code == 2 and "already exists" in err
    assert "restored" in err and ".out.skipit-old" in err, err
    assert _tree(out) == before and _leftovers(tmp_path) == []


def test_a_finished_swap_leftover_is_removed(previous_output: Path, tmp_path: Path, caplog: Any) -> None:
    out, hidden = tmp_path / "out", tmp_path / ".out.skipit-old"
    shutil.copytree(previous_output, out)
    shutil.copytree(previous_output, hidden)
    with OutputDir(out, overwrite=True):
        pass
    assert not hidden.exists() and "removed" in caplog.text and ".out.skipit-old" in caplog.text
    assert (out / "skipit_manifest.json").is_file() and _leftovers(tmp_path) == []


def test_stale_staging_folders_are_removed_but_not_a_live_runs(model: Path, tmp_path: Path, capsys: Any) -> None:
    stale_same, stale_other = tmp_path / ".out.skipit-tmp-dead1", tmp_path / ".other.skipit-tmp-dead2"
    for stale in (stale_same, stale_other):
        (stale / "model").mkdir(parents=True)
        (stale / "model" / "model.safetensors").write_bytes(b"0" * 1000)
    with OutputDir(tmp_path / "busy") as live:  # another run, still working on its own output
        code, err = _run(capsys, model, tmp_path / "out", *FAST)
        assert live.staging.is_dir(), "a live run's staging folder was removed"
    assert code == 0
    assert not stale_same.exists() and not stale_other.exists()
    assert err.count("a temporary folder left by an interrupted skipit run") == 2, err
    assert _leftovers(tmp_path) == []


# --- signals and the reload child --------------------------------------------------------------------
def _cli(model: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "skipit.cli", "compress", str(model), str(out), *FAST],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def _wait_for(what: Callable[[], Any], seconds: float = 180) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("timed out")


def _children(pid: int) -> list[tuple[int, str]]:
    """Live children of ``pid`` with their command lines (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append((int(stat.parent.name), cmd))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_cleans_up_like_ctrl_c(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _cli(model, out)
    _wait_for(lambda: list(tmp_path.glob(".out.skipit-tmp-*")))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "terminated" in err and "Traceback" not in err, err
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the reload child")
def test_reload_child_dies_with_its_parent_and_the_next_run_cleans_up(model: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "out"
    proc = _cli(model, out)
    [(child, _)] = _wait_for(lambda: [c for c in _children(proc.pid) if "reload_check.py" in c[1]])
    proc.kill()  # SIGKILL: no handler runs in the parent
    proc.communicate(timeout=30)
    _wait_for(lambda: not _alive(child), seconds=15)
    assert not out.exists() and list(tmp_path.glob(".out.skipit-tmp-*")), "the killed run's staging folder is gone?"
    code, err = _run(capsys, model, out, *FAST)  # the next run: not blocked by the dead run's lock, cleans up
    assert code == 0 and "a temporary folder left by an interrupted skipit run" in err, err
    assert (out / "skipit_manifest.json").is_file() and _leftovers(tmp_path) == []


# --- what the output records -------------------------------------------------------------------------
def test_output_gets_the_umask_and_the_manifest_resolved_paths(model: Path, tmp_path: Path, monkeypatch: Any,
                                                               capsys: Any) -> None:
    (tmp_path / "data").mkdir()
    lines = [json.dumps({"text": f"A sentence about the river, number {i}."}) for i in range(12)]
    (tmp_path / "data" / "calib.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    previous = os.umask(0o027)
    try:
        code, err = _run(capsys, os.path.relpath(model, tmp_path), "out", *FAST, "--calib", "data/calib.jsonl")
    finally:
        os.umask(previous)
    assert code == 0, err
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    manifest = json.loads((tmp_path / "out" / "skipit_manifest.json").read_text())
    assert manifest["source"]["path"] == str(model.resolve())
    assert manifest["calibration"]["source"] == str((tmp_path / "data" / "calib.jsonl").resolve())


# --- refused before any work -----------------------------------------------------------------------
@pytest.fixture()
def unloadable(tmp_path: Path) -> Path:
    """A model folder that fails to load: an error about the output or an option proves it came first."""
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text("{ not json")
    return bad


def test_out_dir_dot_is_refused_before_loading(unloadable: Path, tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    code, err = _run(capsys, unloadable, ".", *FAST, "--overwrite")
    assert code == 2 and "current directory" in err, err
    assert list((tmp_path / "work").iterdir()) == []


def test_read_only_parent_is_refused_before_loading(unloadable: Path, tmp_path: Path, capsys: Any) -> None:
    if os.geteuid() == 0:  # root writes through file modes; sysfs refuses new entries even to root
        out = Path("/sys/skipit-read-only-test/out")
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        out = tmp_path / "ro" / "out"
    code, err = _run(capsys, unloadable, out, *FAST)
    assert code == 2 and "cannot write in" in err, err
    assert not out.exists()


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--calib-limit", "-1", "--calib-limit must be ≥ 6"),
    ("--max-length", "0", "--max-length must be ≥ 2"),
    ("--batch-size", "0", "--batch-size must be ≥ 1"),
    ("--eps", "nan", "--eps is a cosine-distance threshold"),
    ("--max-kl", "nan", "--max-kl must be a finite number"),
    ("--max-kl", "inf", "--max-kl must be a finite number"),
    ("--min-top1", "2", "--min-top1 is an agreement rate in [0, 1]"),
    ("--confidence", "nan", "confidence must be in"),
])
def test_bad_numbers_are_refused_before_loading(unloadable: Path, tmp_path: Path, capsys: Any, option: str, value: str,
                                                message: str) -> None:
    argv = FAST
    if option in FAST:  # drop FAST's own value of the option
        i = FAST.index(option)
        argv = FAST[:i] + FAST[i + 2:]
    code, err = _run(capsys, unloadable, tmp_path / "out", *argv, option, value)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
