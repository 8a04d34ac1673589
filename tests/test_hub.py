"""Hub ids as MODEL (:mod:`skipit.compressor.hub`): a repo placed in a temporary Hugging Face cache, in the
cache's own layout (``models--org--name/{blobs,snapshots/<commit>,refs/main}``), resolved offline
(``HF_HUB_OFFLINE=1``, set by conftest) by the real huggingface_hub; a missing repo is exit 2 saying how to
download it; a local path wins; only the files skipit needs are asked for."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from skipit.compressor.hub import CHECKPOINT_PATTERNS, PICKLE_PATTERNS, _IGNORE, looks_like_hub_id, resolve_model
from skipit.errors import ModelLoadError

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "skipit-test/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def place_in_cache(cache: Path, repo_id: str, commit: str, files: dict[str, Path | bytes], ref: str | None = "main") -> Path:
    """Lay files out as huggingface_hub does: content-addressed blobs, a snapshot of relative symlinks, a ref."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tiny_model_dir, tmp_path_factory) -> Path:
    """A cache holding the tiny Llama at two commits (``main`` → COMMIT) and a GGUF-only repo."""
    cache = tmp_path_factory.mktemp("hf-home") / "hub"
    model = tiny_model_dir("LlamaForCausalLM")
    files = {p.name: p for p in model.iterdir() if p.is_file()}
    place_in_cache(cache, REPO_ID, OLD_COMMIT, files, ref=None)
    place_in_cache(cache, REPO_ID, COMMIT, files)
    place_in_cache(cache, "skipit-test/tiny-gguf", COMMIT, {"README.md": b"# GGUF only\n", "tiny.Q4_1.gguf": b"GGUF..."})
    return cache


def test_hub_id_resolves_to_the_snapshot_and_its_commit(hub_cache: Path) -> None:
    from skipit.compressor.loading import load_model

    resolved = resolve_model(REPO_ID, cache_dir=hub_cache)
    assert resolved.path == hub_cache / "models--skipit-test--tiny-llama" / "snapshots" / COMMIT
    assert (resolved.repo_id, resolved.revision, resolved.commit, resolved.from_hub) == (REPO_ID, None, COMMIT, True)
    assert resolved.as_dict()["commit"] == COMMIT
    loaded = load_model(resolved.path)  # the snapshot is a model folder skipit loads as it is
    assert loaded.model.config.num_hidden_layers >= 6
    pinned = resolve_model(REPO_ID, revision=OLD_COMMIT, cache_dir=hub_cache)
    assert pinned.commit == OLD_COMMIT and pinned.revision == OLD_COMMIT and pinned.path.name == OLD_COMMIT


def test_huggingface_hub_itself_accepts_the_cache(hub_cache: Path) -> None:
    """The layout the tests build is the library's own: its cache scanner and downloader read it offline."""
    from huggingface_hub import hf_hub_download, scan_cache_dir

    info = scan_cache_dir(hub_cache)
    repo = next(r for r in info.repos if r.repo_id == REPO_ID)
    assert {rev.commit_hash for rev in repo.revisions} == {COMMIT, OLD_COMMIT}
    main = next(rev for rev in repo.revisions if rev.commit_hash == COMMIT)
    assert main.refs == frozenset({"main"}) and "config.json" in {f.file_name for f in main.files}
    path = hf_hub_download(REPO_ID, "config.json", cache_dir=hub_cache, local_files_only=True)
    assert Path(path) == resolve_model(REPO_ID, cache_dir=hub_cache).path / "config.json"


def test_hf_home_is_honoured(hub_cache: Path) -> None:
    """No --cache-dir: huggingface_hub's default cache, $HF_HOME/hub (read in a fresh process, as the library does)."""
    env = {**os.environ, "HF_HOME": str(hub_cache.parent), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("HF_HUB_CACHE", None)
    code = "from skipit.compressor.hub import resolve_model; r = resolve_model(%r); print(r.path); print(r.commit)" % REPO_ID
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    path, commit = proc.stdout.split()
    assert Path(path) == hub_cache / "models--skipit-test--tiny-llama" / "snapshots" / COMMIT and commit == COMMIT


def test_missing_repo_offline_is_exit_2_saying_how_to_download(hub_cache: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        resolve_model("skipit-test/not-downloaded", cache_dir=hub_cache)
    message = str(err.value)
    assert err.value.exit_code == 2
    assert "HF_HUB_OFFLINE=1" in message and "hf download skipit-test/not-downloaded" in message
    assert "huggingface-cli download skipit-test/not-downloaded" in message and "HF_HUB_OFFLINE=0" in message
    assert str(hub_cache) in message
    with pytest.raises(ModelLoadError, match=r"--revision v9"):
        resolve_model(REPO_ID, revision="v9", cache_dir=hub_cache)  # a ref that is not cached


def test_gguf_file_in_a_repo(hub_cache: Path) -> None:
    resolved = resolve_model("skipit-test/tiny-gguf/tiny.Q4_1.gguf", cache_dir=hub_cache)
    assert resolved.path.name == "tiny.Q4_1.gguf" and resolved.path.is_file()
    assert (resolved.filename, resolved.commit) == ("tiny.Q4_1.gguf", COMMIT)
    with pytest.raises(ModelLoadError, match=r"no file other\.gguf.*tiny\.Q4_1\.gguf"):
        resolve_model("skipit-test/tiny-gguf/other.gguf", cache_dir=hub_cache)
    with pytest.raises(ModelLoadError, match=r"no config\.json.*give skipit-test/tiny-gguf/tiny\.Q4_1\.gguf"):
        resolve_model("skipit-test/tiny-gguf", cache_dir=hub_cache)


def test_a_local_path_wins(hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir) -> None:
    local = tmp_path / REPO_ID
    shutil.copytree(tiny_model_dir("LlamaForCausalLM"), local)
    monkeypatch.chdir(tmp_path)
    resolved = resolve_model(REPO_ID, cache_dir=hub_cache)  # "skipit-test/tiny-llama" exists here as a folder
    assert resolved.path == Path(REPO_ID) and not resolved.from_hub and resolved.commit is None
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(tmp_path / "no" / "such" / "model")
    assert looks_like_hub_id("org/name") and looks_like_hub_id("org/name/sub/file.Q4_K_M.gguf")
    assert not looks_like_hub_id("./org/name") and not looks_like_hub_id("/abs/path") and not looks_like_hub_id("name")


def test_only_what_skipit_loads_is_downloaded() -> None:
    """The patterns, applied by huggingface_hub's own filter to a typical repo's file list."""
    from huggingface_hub.utils import filter_repo_objects

    repo = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "README.md", "LICENSE",
            "pytorch_model.bin", "pytorch_model.bin.index.json", "modeling_custom.py", "onnx/model.onnx",
            "onnx/model.safetensors", "original/consolidated.safetensors", "model.Q4_K_M.gguf", ".gitattributes"]

    def fetched(patterns: tuple[str, ...]) -> set[str]:
        return set(filter_repo_objects(repo, allow_patterns=list(patterns), ignore_patterns=list(_IGNORE)))

    plain = fetched(CHECKPOINT_PATTERNS)
    assert plain == {"config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "README.md", "LICENSE"}
    assert fetched(CHECKPOINT_PATTERNS + PICKLE_PATTERNS) - plain == {"pytorch_model.bin", "pytorch_model.bin.index.json"}


def test_validate_takes_a_hub_id_as_the_original(hub_cache: Path, tiny_model_dir, tmp_path: Path) -> None:
    import json

    from skipit.cli import main as skipit_main

    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Sample {i}: a short line of plain text."}) for i in range(8)))
    out = tmp_path / "gate.json"
    code = skipit_main(["validate", REPO_ID, str(tiny_model_dir("LlamaForCausalLM")), "--cache-dir", str(hub_cache),
                        "--revision", "main", "--data", str(data), "--new-tokens", "0", "--max-kl", "1e-3",
                        "--json", str(out)])
    assert code == 0 and json.loads(out.read_text())["original"] == REPO_ID
    assert skipit_main(["validate", "skipit-test/absent", str(tiny_model_dir("LlamaForCausalLM")),
                        "--cache-dir", str(hub_cache)]) == 2


def test_compress_takes_a_hub_id_and_records_it(hub_cache: Path, tmp_path: Path) -> None:
    """skipit-compress org/name OUT: the repo from the cache; repo id and commit in the manifest, base_model in the card."""
    import json

    from skipit.cli import main

    out = tmp_path / "out"
    code = main(["compress", REPO_ID, str(out), "--cache-dir", str(hub_cache), "--max-layers", "1", "--calib-limit", "12",
                 "--max-length", "24", "--batch-size", "4", "--probe-width", "1"])
    assert code == 0
    source = json.loads((out / "skipit_manifest.json").read_text())["source"]
    assert source["repo_id"] == REPO_ID and source["commit"] == COMMIT and COMMIT in source["path"]
    card = (out / "model" / "README.md").read_text()
    assert f"base_model: {REPO_ID}" in card
