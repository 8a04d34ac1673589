"""Writing next to a user's files without ever losing one of them.

* :func:`write_atomic` — one file: a temporary file beside it, then ``os.replace``; :func:`atomic_file`
  the same for a writer that wants a path (e.g. gguf's), with a check before the rename.
* :class:`OutputDir` — a whole output directory (``skipit-compress``'s ``OUT_DIR``):

  - a lock file ``.OUT.skipit-lock`` beside ``OUT`` is held (``flock``) from before loading to the
    end of the run, so that of two runs into one ``OUT`` exactly one proceeds; the kernel releases
    it when a process dies, so a killed run never blocks the next one;
  - before any work: ``OUT`` may not overlap an input or the current directory, its parent must be
    writable, an existing ``OUT`` is refused unless ``overwrite`` is given *and* it is a folder
    skipit wrote (it holds the marker file, ``skipit_manifest.json``);
  - results are staged in ``.OUT.skipit-tmp-*`` (with the user's umask) and moved into place only
    by :meth:`OutputDir.commit`; an ``OUT`` that appeared meanwhile is never touched (the result is
    kept in ``OUT.skipit-new`` and the error says so);
  - replacing goes through ``.OUT.skipit-old``: a run killed between the two renames is repaired by
    the next run into the same place (old output restored, or a finished swap's leftover removed),
    and stale staging folders of killed runs are removed — each with a warning naming the folder.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator

from skipit.errors import InvalidOptionError, OutputExistsError

log = logging.getLogger(__name__)

TMP_TAG, OLD_TAG, LOCK_TAG, NEW_TAG = ".skipit-tmp-", ".skipit-old", ".skipit-lock", ".skipit-new"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write (and check); when the block ends without an error it
    becomes ``path`` (``os.replace``: readers see old or new, never half), as readable as the umask allows
    (``mkstemp`` creates 0600); on an error it is removed and ``path`` left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file beside it: readers see old or new, never half."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; raise ``FileExistsError`` if ``dst`` exists (never replaces it).

    Linux ``renameat2(RENAME_NOREPLACE)`` makes the check and the rename one step; elsewhere a plain
    rename, which fails on a non-empty directory anyway, follows an existence check.
    """
    if _renameat2(src, dst):
        return
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


def _renameat2(src: Path, dst: Path) -> bool:
    """``renameat2(..., RENAME_NOREPLACE)`` through libc; False where it is not available."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_noreplace = -100, 1
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):  # old kernel or a file system without the flag
        return False
    raise OSError(err, os.strerror(err), str(dst))


class _Lock:
    """An exclusive ``flock`` on a lock file; the file is removed when the lock is released."""

    def __init__(self, path: Path, handle: IO[str]) -> None:
        self.path, self.handle = path, handle

    @classmethod
    def acquire(cls, path: Path) -> "_Lock | None":
        """The lock, or None when another live process holds it."""
        import fcntl

        while True:
            handle = open(path, "a+")  # noqa: SIM115 - held for the whole run
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                return None
            try:  # the previous holder may have removed the file between our open and our flock
                same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                handle.seek(0)
                handle.truncate()
                handle.write(f"{os.getpid()}\n")
                handle.flush()
                return cls(path, handle)
            handle.close()

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        self.handle.close()


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


class OutputDir:
    """A whole output directory written atomically and safely; see the module docstring.

    Use as a context manager around the whole run::

        with OutputDir(out, overwrite=False, inputs=[model_dir, calib_file]) as output:
            ...                      # load, compute; write files under output.staging
            output.commit()          # move into place (never over a folder skipit did not write)
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike[str] | None] = (),
                 protect: Iterable[str | os.PathLike[str] | None] = (), marker: str = "skipit_manifest.json") -> None:
        """``inputs``: paths the output may neither be, hold nor lie inside (the model); ``protect``: paths
        the output may not be or hold (the calibration file and its folder; a new folder inside is fine)."""
        self.out_dir = Path(out_dir)
        self.overwrite = overwrite
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.protect = [Path(p) for p in protect if p is not None]
        self.marker = marker
        self.staging = Path()
        self.committed = False
        self._lock: _Lock | None = None

    # -- names beside OUT_DIR ------------------------------------------------------------------
    def _sibling(self, tag: str, name: str | None = None) -> Path:
        return self.out_dir.parent / f".{name or self.out_dir.name}{tag}"

    def is_ours(self, path: Path) -> bool:
        """Whether ``path`` is a folder skipit wrote (it holds the marker file)."""
        return path.is_dir() and not path.is_symlink() and (path / self.marker).is_file()

    # -- checks ---------------------------------------------------------------------------------
    def _check_overlap(self) -> None:
        """Refuse an output that is, holds or lies inside an input, or is (or holds) the current directory."""
        out = self.out_dir.resolve()
        cwd = Path.cwd().resolve()
        if out == cwd or out in cwd.parents:
            raise InvalidOptionError(f"output {self.out_dir} is the current directory or holds it; name a new folder "
                                     "for skipit's output, e.g. ./slim-model")
        for given in self.inputs + self.protect:
            src = given.resolve()
            inside = given in self.inputs and src in out.parents
            if out == src or out in src.parents or inside:
                raise InvalidOptionError(f"output {self.out_dir} overlaps the input {given}; choose a directory "
                                         "outside it")

    def _check_existing(self) -> None:
        out = self.out_dir
        if not (out.exists() or out.is_symlink()):
            return
        if not out.is_dir() or out.is_symlink():
            raise OutputExistsError(f"{out} exists and is not a folder; choose another output directory")
        if not self.overwrite:
            raise OutputExistsError(f"{out} already exists; choose another directory, or pass --overwrite to replace "
                                    "an earlier skipit output there")
        if not self.is_ours(out):
            raise OutputExistsError(
                f"{out} exists and was not written by skipit (it has no {self.marker}); --overwrite replaces only "
                "skipit's own output folders. Choose another directory, or move that folder away yourself")

    # -- the run --------------------------------------------------------------------------------
    def __enter__(self) -> "OutputDir":
        """Check, lock, repair what a killed run left, check again, and create the staging folder."""
        self._check_overlap()
        parent = self.out_dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            lock = _Lock.acquire(self._sibling(LOCK_TAG))
        except OSError as exc:
            raise InvalidOptionError(f"cannot write in {parent} ({exc.strerror or exc}); choose an output directory "
                                     "in a folder you can write to") from None
        if lock is None:
            raise OutputExistsError(f"another skipit run{_holder(self._sibling(LOCK_TAG))} is writing {self.out_dir}; "
                                    "wait for it to finish or choose another output directory")
        self._lock = lock
        try:
            self._recover()
            self._check_existing()
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}{TMP_TAG}", dir=parent))
            os.chmod(self.staging, 0o777 & ~_umask())  # mkdtemp makes 0700; the output gets the user's umask
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        if self.staging != Path() and self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _recover(self) -> None:
        """Repair what a killed run left beside OUT_DIR (we hold the lock, so nothing here is live)."""
        old = self._sibling(OLD_TAG)
        if old.is_dir():
            if not (self.out_dir.exists() or self.out_dir.is_symlink()):
                os.rename(old, self.out_dir)
                log.warning("restored %s from %s: an earlier run was interrupted while replacing it",
                            self.out_dir, old.name)
            elif self.is_ours(self.out_dir):  # the swap was complete: old is the output it replaced
                shutil.rmtree(old)
                log.warning("removed %s, the previous output that an earlier run replaced just before it was "
                            "interrupted", old)
            else:
                log.warning("left %s (an earlier skipit output) alone because %s is not skipit's; remove or "
                            "rename it yourself", old, self.out_dir)
        for stale in sorted(self.out_dir.parent.glob(f".*{TMP_TAG}*")):
            name = stale.name[1:].split(TMP_TAG)[0]
            if not stale.is_dir() or stale.is_symlink():
                continue
            if name == self.out_dir.name:
                self._remove_stale(stale)
                continue
            other = _Lock.acquire(self._sibling(LOCK_TAG, name))
            if other is not None:  # nobody is writing that output: the folder is a killed run's
                try:
                    self._remove_stale(stale)
                finally:
                    other.release()

    @staticmethod
    def _remove_stale(stale: Path) -> None:
        shutil.rmtree(stale, ignore_errors=True)
        log.warning("removed %s, a temporary folder left by an interrupted skipit run", stale)

    def commit(self) -> Path:
        """Move the staged folder into place; never over a folder that skipit did not write."""
        out, staged = self.out_dir, self.staging
        if self.overwrite and (out.exists() or out.is_symlink()):
            self._check_existing()
            old = self._sibling(OLD_TAG)
            os.rename(out, old)
            try:
                _rename_noreplace(staged, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old)
        else:
            try:
                _rename_noreplace(staged, out)
            except FileExistsError:
                kept = self._keep_aside()
                raise OutputExistsError(
                    f"{out} appeared while skipit was running and was left untouched; the finished result is in "
                    f"{kept} — move it where you want it") from None
        self.committed = True
        return out

    def _keep_aside(self) -> Path:
        for i in range(1000):
            kept = self.out_dir.with_name(f"{self.out_dir.name}{NEW_TAG}" + (f"-{i}" if i else ""))
            try:
                _rename_noreplace(self.staging, kept)
                return kept
            except FileExistsError:
                continue
        raise OutputExistsError(f"could not find a free name beside {self.out_dir} for the finished result")

