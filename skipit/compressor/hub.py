"""Hugging Face Hub ids as MODEL: ``org/name`` (or ``org/name/file.gguf``) → a folder (or file) on disk.

:func:`resolve_model` is what every command calls on its MODEL argument before
:func:`~skipit.compressor.loading.load_model`:

* a local path that exists wins (nothing is looked up, nothing downloaded);
* otherwise a Hub-shaped reference is resolved by ``huggingface_hub.snapshot_download``, which honours
  ``HF_HOME`` / ``HF_HUB_CACHE`` (where the cache is), ``HF_HUB_OFFLINE=1`` (cache only, no network),
  ``HF_TOKEN`` (private and gated repos), and here ``revision`` and ``cache_dir``. Only what skipit loads
  is downloaded: config, tokenizer and processor files, ``*.safetensors`` and their index, the model
  card — or, for ``org/name/file.gguf``, that one file. Pickled weights (``*.bin``) only with
  ``allow_pickle``, Python files only with ``trust_remote_code``.

The repo id and the commit the revision resolved to are returned, for the manifest and the model card.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skipit.errors import ModelLoadError

log = logging.getLogger(__name__)

#: what skipit needs from a checkpoint repo (top-level files only; see ``_IGNORE``)
CHECKPOINT_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", "README.md",
    "LICENSE*", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.tiktoken",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json", "chat_template*",
    "spiece.model", "sentencepiece*.model",
)
PICKLE_PATTERNS = ("*.bin", "pytorch_model.bin.index.json")
CODE_PATTERNS = ("*.py",)
#: fnmatch's ``*`` crosses ``/``: without this, ``*.safetensors`` would also fetch copies in subfolders
_IGNORE = ("*/*",)
# org/name, optionally followed by the path of a .gguf file inside the repo (Hub naming rules, loosely)
_HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:/(?P<file>(?:[\w.-]+/)*[\w.-]+\.gguf))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a MODEL argument lives on disk, and where it came from.

    Attributes:
        path: a model folder or a ``.gguf`` file, ready for :func:`~skipit.compressor.loading.load_model`.
        repo_id: the Hub repo (``org/name``) when MODEL was a Hub id, else None.
        revision: the revision asked for (None: the repo's default branch).
        commit: the commit ``revision`` resolved to (the snapshot's folder name), else None.
        filename: the file inside the repo for ``org/name/file.gguf``, else None.
    """

    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    filename: str | None = None

    @property
    def from_hub(self) -> bool:
        return self.repo_id is not None

    def as_dict(self) -> dict[str, Any]:
        """For the manifest (``source``): the Hub coordinates, or just the local path."""
        return {"path": str(self.path), "repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "filename": self.filename}


def looks_like_hub_id(ref: str) -> bool:
    """Whether ``ref`` has the shape of ``org/name`` or ``org/name/file.gguf`` (it may still be a local path)."""
    return _HUB_REF.match(ref) is not None


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now; huggingface_hub reads it once at import."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return constants.HF_HUB_OFFLINE or (now or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _cache_dir(cache_dir: Path | None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)


def resolve_model(ref: str | Path, *, revision: str | None = None, cache_dir: Path | None = None,
                  allow_pickle: bool = False, trust_remote_code: bool = False) -> ResolvedModel:
    """A MODEL argument → :class:`ResolvedModel` (see the module docstring).

    Raises:
        ModelLoadError: (exit 2) MODEL is neither an existing path nor a Hub id; the repo, revision or file
            does not exist or is not accessible; or it is not in the cache while offline — the message
            says how to download it.
    """
    text = str(ref)
    local = Path(text).expanduser()
    if local.exists():
        if revision is not None or cache_dir is not None:
            log.warning("%s is a local path: --revision and --cache-dir apply to Hub ids only and are ignored", text)
        return ResolvedModel(local)
    match = _HUB_REF.match(text)
    if match is None:
        raise ModelLoadError(f"{text} does not exist; give a model directory (config.json + *.safetensors), a .gguf "
                             "file or a Hugging Face Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct")
    repo_id, filename = match["repo"], match["file"]
    patterns = [filename] if filename else [*CHECKPOINT_PATTERNS, *(PICKLE_PATTERNS if allow_pickle else ()),
                                            *(CODE_PATTERNS if trust_remote_code else ())]
    snapshot = _snapshot(repo_id, revision, cache_dir, patterns, ignore=None if filename else list(_IGNORE))
    commit = snapshot.name if _COMMIT.match(snapshot.name) else None
    path = snapshot / filename if filename else snapshot
    where = f"{repo_id}" + (f"@{revision}" if revision else "") + (f" (commit {commit[:12]})" if commit else "")
    if filename and not path.is_file():
        raise ModelLoadError(f"the Hub repo {where} has no file {filename}{_gguf_hint(snapshot, repo_id, revision)}")
    if not filename and not (path / "config.json").is_file():
        ggufs = _gguf_hint(snapshot, repo_id, revision)
        raise ModelLoadError(f"the Hub repo {where} has no config.json, so it is not a transformers checkpoint"
                             + (ggufs or "; give a repo with config.json and *.safetensors, or org/name/FILE.gguf"))
    log.info("%s resolved to %s", where, path)
    return ResolvedModel(path, repo_id, revision, commit, filename)


def _snapshot(repo_id: str, revision: str | None, cache_dir: Path | None, patterns: list[str],
              ignore: list[str] | None) -> Path:
    """``snapshot_download`` with its failures turned into :class:`ModelLoadError` s that say what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hub

    offline = _offline()
    rev = f" --revision {revision}" if revision else ""
    download = (f"download it where the Hub is reachable with `hf download {repo_id}{rev}` (older huggingface_hub: "
                f"`huggingface-cli download {repo_id}{rev}`) into this cache (HF_HOME / --cache-dir)")
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns,
                                   ignore_patterns=ignore, local_files_only=offline)
    except hub.GatedRepoError:
        raise ModelLoadError(f"the Hub repo {repo_id} is gated: accept its terms on its Hub page, then log in "
                             "(`hf auth login`) or set HF_TOKEN") from None
    except hub.RepositoryNotFoundError:
        raise ModelLoadError(f"{repo_id} is neither a local path nor a Hub repo you can access (check the spelling; "
                             "for a private repo log in with `hf auth login` or set HF_TOKEN)") from None
    except hub.RevisionNotFoundError:
        raise ModelLoadError(f"the Hub repo {repo_id} has no revision {revision!r} (a branch, tag or commit)") from None
    except hub.LocalEntryNotFoundError as exc:  # not (or not completely) in the cache, and no network
        cache = _cache_dir(cache_dir)
        if offline:
            why = f"HF_HUB_OFFLINE=1 and {repo_id}{'@' + revision if revision else ''} is not in the cache {cache}"
            fix = f"{download}, or set HF_HUB_OFFLINE=0 to let skipit download it"
        else:
            why = f"the Hub could not be reached and {repo_id} is not (completely) in the cache {cache}"
            fix = f"check the network (or HF_ENDPOINT) and try again, or {download}"
        incomplete = " (the cached snapshot is incomplete)" if type(exc).__name__ == "IncompleteSnapshotError" else ""
        raise ModelLoadError(f"{repo_id} is no local path, and as a Hub id it cannot be fetched: {why}{incomplete}; "
                             f"{fix}") from None
    except (hub.HfHubHTTPError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot get {repo_id} from the Hub: {first}") from None
    return Path(folder)


def _gguf_hint(snapshot: Path, repo_id: str | None = None, revision: str | None = None) -> str:
    """``; it holds GGUF files a.gguf, b.gguf: give org/name/a.gguf`` when the repo's file list is known."""
    names = _repo_files(repo_id, revision) if repo_id else []
    names = names or sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    ggufs = [n for n in names if n.endswith(".gguf")]
    if not ggufs:
        return ""
    shown = ", ".join(ggufs[:4]) + (f" … ({len(ggufs)} in all)" if len(ggufs) > 4 else "")
    return f"; it holds GGUF files ({shown}): give {repo_id or 'org/name'}/{ggufs[0]}"


def _repo_files(repo_id: str, revision: str | None) -> list[str]:
    """The repo's file list from the Hub; [] offline or on any failure (only used for a hint)."""
    if _offline():
        return []
    try:
        from huggingface_hub import list_repo_files

        return sorted(list_repo_files(repo_id, revision=revision))
    except Exception:  # noqa: BLE001 - a hint only; the error it decorates is already decided
        return []
