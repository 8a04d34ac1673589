"""What every command shares: output flags, logging, progress display, signals, errors → exit codes.

Only the CLI knows about terminals: the library reports progress through ``progress(kind, info)``
callbacks, which :class:`Progress` turns into rich bars on a terminal and into one plain line per
step (with its figures) anywhere else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from skipit.errors import ExitCode

#: ``--dtype`` spellings: every command accepts these, and means the canonical torch name.
DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "f32": "float32", "float16": "float16", "fp16": "float16",
                 "f16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16", "auto": "auto"}

EXIT_CODES_HELP = """exit codes:
  0  done          2  bad input or option (one line says what to do; --debug for a traceback)
  3  no layer can be removed within the bound (nothing written)
  4  parity check failed   5  speed check failed   6  exported graph / slim tokenizer does not match the model
  1  internal error (a bug: please report it)   130/143  interrupted / terminated (nothing written)"""


def dtype_arg(text: str) -> str:
    """argparse type of ``--dtype``: any spelling in :data:`DTYPE_ALIASES`, returned canonical."""
    try:
        return DTYPE_ALIASES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dtype; use float32, float16, bfloat16 or auto "
                                         "(fp32 / fp16 / bf16 are accepted too)") from None


def add_output_flags(p: argparse.ArgumentParser, json_file: bool = False) -> None:
    """``--json`` (a flag: JSON on stdout; or ``json_file``: a report file), ``-q``, ``-v``, ``--debug``."""
    if json_file:
        p.add_argument("--json", type=Path, metavar="REPORT_JSON",
                       help="also write the full report (or the error) as JSON to this file")
    else:
        p.add_argument("--json", action="store_true", help="print the result (or the error) as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors: no progress, no step lines")
    p.add_argument("-v", "--verbose", action="store_true", help="log details (and the libraries' own messages)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and context manager cleans up."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_cleans_up() -> Iterator[None]:
    """Within the block, SIGTERM unwinds the stack like SIGINT (temporary folders removed, locks freed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def quiet_libraries(verbose: bool) -> None:
    """No tqdm bars or info chatter from transformers / huggingface_hub between skipit's own lines."""
    import os

    if not verbose:  # raw tqdm bars (transformers' GGUF dequantization); tqdm reads this when first imported
        os.environ.setdefault("TQDM_DISABLE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if not verbose:
        transformers.utils.logging.set_verbosity_error()
    with contextlib.suppress(ImportError):
        import huggingface_hub.utils

        huggingface_hub.utils.disable_progress_bars()


class Progress:
    """Progress events → an overall bar plus one bar per pass on a terminal, step lines elsewhere."""

    def __init__(self, console: Any, quiet: bool = False) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        from rich.progress import Progress as Bars

        self.console, self.quiet = console, quiet
        self.live = console.is_terminal and not quiet
        self.bar = Bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console, transient=False, disable=not self.live)
        self.task: Any = None
        self.overall: Any = None

    def __enter__(self) -> "Progress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def log(self, text: str) -> None:
        """One line (rich markup allowed: callers escape what they did not write)."""
        if not self.quiet:
            self.bar.console.log(text) if self.live else self.console.print(text, highlight=False, soft_wrap=True)

    def _new_task(self, description: str, total: int) -> None:
        if self.task is not None:
            self.bar.update(self.task, visible=False)
        self.task = self.bar.add_task(description, total=total)

    def __call__(self, kind: str, info: dict[str, Any]) -> None:
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(info)

    def _on_stage(self, info: dict[str, Any]) -> None:
        if "of" in info:
            if self.overall is None:
                self.overall = self.bar.add_task("skipit", total=info["of"])
            self.bar.update(self.overall, completed=info["step"] - 1, description=f"[bold]{info['name']}")
        from rich.markup import escape

        self.log(escape(info["name"]))

    def _on_pass_start(self, info: dict[str, Any]) -> None:
        removed = f" without layers {info['removed']}" if info["removed"] else " (original)"
        self._new_task(f"{info['split']} pass{removed}", info["samples"])

    def _on_batch(self, info: dict[str, Any]) -> None:
        if self.task is not None:
            self.bar.advance(self.task, info["n"])

    def _on_step(self, info: dict[str, Any]) -> None:
        verdict = "[green]kept[/]" if info["accepted"] else "[red]rejected[/]"
        what = {"block": f"block {info['layers']}", "swap": f"swap in layer {info['candidate']} → {info['layers']}"}
        self.log(f"{what.get(info.get('kind', ''), 'layer ' + str(info['candidate']))}: KL {info['kl']:.4f} "
                 f"(≤ {info['kl_hi']:.4f}), top-1 {info['top1']:.3f} → {verdict}")

    def _on_verify(self, info: dict[str, Any]) -> None:
        healed = " after healing" if info.get("healed") else ""
        self.log(f"held-out check of {info['layers']}{healed}: KL {info['kl']:.4f} (≤ {info['kl_hi']:.4f})")

    def _on_heal_start(self, info: dict[str, Any]) -> None:
        self.log(f"healing with {info['layers']} removed (held-out KL before: {info['holdout_kl_before']:.4f})")
        self._new_task("healing", info["steps"])

    def _on_heal_step(self, info: dict[str, Any]) -> None:
        self.bar.update(self.task, completed=info["step"], description=f"healing (KL {info['loss']:.4f})")
        if not self.live and (info["step"] % 10 == 0 or info["step"] == info["steps"]):
            self.log(f"healing step {info['step']}/{info['steps']}: KL {info['loss']:.4f}")


def _report_error(args: argparse.Namespace, console: Any, code: int, kind: str, message: str) -> int:
    """One line on stderr; with ``--json`` also a JSON error object (stdout, or the ``--json`` file)."""
    from rich.markup import escape

    # escaped: messages hold brackets that are not markup ("pip install 'skipit[gguf]'", "layers [2, 3]")
    console.print(f"[bold red]{kind}:[/] {escape(message)}", highlight=False, soft_wrap=True)
    target = getattr(args, "json", None)
    if target:
        payload = json.dumps({"error": {"exit_code": int(code), "kind": kind, "message": message}})
        if isinstance(target, Path):
            from skipit.atomic import write_atomic

            write_atomic(target, payload + "\n")
        else:
            print(payload)
    return int(code)


def run_job(args: argparse.Namespace, job: Callable[[Progress, Any], int]) -> int:
    """Run one command: logging, progress, SIGTERM, and every error turned into its exit code."""
    from rich.console import Console
    from rich.logging import RichHandler

    from skipit.errors import SkipitError
    from skipit.heap import cap_heap_growth

    cap_heap_growth()  # long passes of large short-lived tensors: see skipit.heap
    console = Console(stderr=True)
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", force=True,
                        handlers=[RichHandler(console=console, show_path=False, show_time=console.is_terminal)])
    try:
        quiet_libraries(verbose)
        with sigterm_cleans_up(), Progress(console, quiet) as progress:
            return int(job(progress, console))
    except SkipitError as exc:
        if args.debug:
            raise
        return _report_error(args, console, exc.exit_code, "error", str(exc))
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        code = ExitCode.TERMINATED if terminated else ExitCode.INTERRUPTED
        return _report_error(args, console, code, "terminated" if terminated else "interrupted", "nothing was written")
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        if args.debug:
            raise
        return _report_error(args, console, ExitCode.INTERNAL, "internal error",
                             f"{type(exc).__name__}: {exc} — rerun with --debug for the traceback and please report it")


def version_text() -> str:
    """``skipit X (transformers Y, torch Z)`` without importing torch."""
    from importlib import metadata

    from skipit import __version__

    def v(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"skipit {__version__} (transformers {v('transformers')}, torch {v('torch')}, python {sys.version.split()[0]})"
