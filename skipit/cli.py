"""Command line: ``skipit-compress MODEL OUT`` and ``skipit {compress,analyze}``.

Only this module knows about terminals: progress bars and tables are fed by the library's callbacks.
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
from typing import Any, Callable, Iterator, Sequence

EXIT_OK, EXIT_CRASH, EXIT_ERROR, EXIT_NOTHING = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT / SIGTERM, as shells report them


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and context manager cleans up."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_cleans_up() -> Iterator[None]:
    """Within the block, SIGTERM unwinds the stack like SIGINT (temporary folders removed, locks freed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,-1, got {text!r}") from None


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model loading")
    g.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 … (default: cpu)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "auto"],
                   help="weights dtype during measurement (default: float32)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model dir")
    g.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights")
    g = p.add_argument_group("calibration data")
    g.add_argument("--calib", type=Path, help='JSONL with {"text": ...} or {"image": path, "text": ...} lines '
                   "(default: built-in prose, plus drawn images for VLMs)")
    g.add_argument("--calib-limit", type=int, help="use at most this many samples")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-length", type=int, default=128, help="tokens per text sample (default: 128)")
    g.add_argument("--eps", type=float, default=0.1, help="cosine-distance threshold of the proximal condition")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="model directory (config.json + safetensors) or a .gguf file")
    p.add_argument("out_dir", type=Path, help="output directory (model/, skipit_manifest.json, README.md)")
    g = p.add_argument_group("certificate")
    g.add_argument("--max-kl", type=float, default=None,
                   help="bound on mean KL(original‖slim) in nats/token on held-out data, at --confidence "
                   "(default 0.05 unless only --max-layers is given)")
    g.add_argument("--max-layers", type=int, help="remove at most this many layers")
    g.add_argument("--min-top1", type=float, help="lower bound on top-1 agreement with the original")
    g.add_argument("--protect", type=_int_list, default=(0, -1), help="layers never removed (default: 0,-1)")
    g.add_argument("--confidence", type=float, default=0.95)
    g.add_argument("--probe-width", type=int,
                   help="best-ranked candidates tried per step: screened on a quarter of the calibration data, the "
                        "best two verified on all of it (default 6; 1 = fastest, one candidate verified per step)")
    g = p.add_argument_group("healing (distil the slim model toward the original after removal)")
    g.add_argument("--heal", action="store_true",
                   help="heal: choose layers under --heal-slack × the bound, train the layers next to each gap toward "
                        "the original's next-token distributions, then certify the healed model on held-out data")
    g.add_argument("--heal-data", type=Path, help="extra unlabeled JSONL for healing (same format as --calib)")
    g.add_argument("--heal-steps", type=int, help="optimizer steps, one calibration batch each (default 80)")
    g.add_argument("--heal-minutes", type=float, help="stop healing after this many minutes")
    g.add_argument("--heal-lr", type=float, help="learning rate (default 1e-4)")
    g.add_argument("--heal-scope", choices=["adjacent", "all"], help="train the layers next to each gap (default) or all")
    g.add_argument("--heal-method", choices=["full", "lora"], help="full weights (default) or low-rank updates merged back")
    g.add_argument("--heal-slack", type=float, help="selection bound before healing, as a multiple of --max-kl (default 2)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it holds an earlier skipit output (never any other folder)")
    p.add_argument("--export", type=lambda t: tuple(x for x in t.split(",") if x), default=(),
                   help="also export: onnx, or onnx,trt (engines need TensorRT and a GPU; skipped with a message otherwise)")
    p.add_argument("--validate", action="store_true",
                   help="run the `skipit validate` gate on the untouched test split (and ONNX parity); its exit code")
    _add_backend(p)
    _add_common(p)


def _add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="torch", choices=["torch", "optimum"],
                   help="ONNX exporter: skipit's own torch.onnx route (default) or optimum's "
                        "(text decoders; needs optimum-onnx, i.e. transformers<4.58)")


def _options(args: argparse.Namespace, compress: bool) -> Any:
    from skipit.compressor.analyze import AnalyzeConfig
    from skipit.compressor.certify import CertifyPolicy
    from skipit.compressor.loading import LoadOptions
    from skipit.pipeline import CompressOptions, DataOptions

    policy = CertifyPolicy()
    if compress:
        max_kl = args.max_kl if args.max_kl is not None or args.max_layers is not None else 0.05
        width = {} if args.probe_width is None else {"probe_width": args.probe_width}
        policy = CertifyPolicy(max_kl=max_kl, max_layers=args.max_layers, min_top1=args.min_top1, protect=args.protect,
                               confidence=args.confidence, **width)
    return CompressOptions(
        heal=_heal_config(args) if getattr(args, "heal", False) else None,
        heal_data=getattr(args, "heal_data", None),
        load=LoadOptions(args.dtype, args.device, args.trust_remote_code, args.allow_pickle),
        data=DataOptions(args.calib, args.calib_limit, args.batch_size, args.max_length),
        policy=policy,
        analyze=AnalyzeConfig(eps=args.eps),
        overwrite=getattr(args, "overwrite", False),
        export=getattr(args, "export", ()),
        backend=getattr(args, "backend", "torch"),
        validate=getattr(args, "validate", False),
    )


def _heal_config(args: argparse.Namespace) -> Any:
    from skipit.compressor.heal import HealConfig

    given = {"steps": args.heal_steps, "minutes": args.heal_minutes, "lr": args.heal_lr, "scope": args.heal_scope,
             "method": args.heal_method, "select_slack": args.heal_slack}
    return HealConfig(**{k: v for k, v in given.items() if v is not None})


class _Progress:
    """Rich progress bars fed by the library's progress events (on stderr, so --json stays clean)."""

    def __init__(self, console: Any) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.console = console
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(),
                            console=console, transient=False)
        self.task: Any = None

    def __enter__(self) -> "_Progress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, kind: str, info: dict[str, Any]) -> None:
        if kind == "stage":
            self.bar.console.log(info["name"])
        elif kind == "pass_start":
            removed = f" without layers {info['removed']}" if info["removed"] else " (original)"
            if self.task is not None:
                self.bar.update(self.task, visible=False)
            self.task = self.bar.add_task(f"{info['split']} pass{removed}", total=info["samples"])
        elif kind == "batch" and self.task is not None:
            self.bar.advance(self.task, info["n"])
        elif kind == "step":
            verdict = "[green]kept[/]" if info["accepted"] else "[red]rejected[/]"
            what = {"block": f"block {info['layers']}", "swap": f"swap in layer {info['candidate']} → {info['layers']}"}
            self.bar.console.log(f"{what.get(info.get('kind'), 'layer ' + str(info['candidate']))}: KL {info['kl']:.4f} "
                                 f"(≤ {info['kl_hi']:.4f}), "
                                 f"top-1 {info['top1']:.3f} → {verdict}")
        elif kind == "verify":
            healed = " after healing" if info.get("healed") else ""
            self.bar.console.log(f"held-out check of {info['layers']}{healed}: KL {info['kl']:.4f} (≤ {info['kl_hi']:.4f})")
        elif kind == "heal_start":
            if self.task is not None:
                self.bar.update(self.task, visible=False)
            self.bar.console.log(f"healing with {info['layers']} removed (held-out KL before: "
                                 f"{info['holdout_kl_before']:.4f})")
            self.task = self.bar.add_task("healing", total=info["steps"])
        elif kind == "heal_step" and self.task is not None:
            self.bar.update(self.task, completed=info["step"], description=f"healing (KL {info['loss']:.4f})")


def _summary(console: Any, manifest: dict[str, Any], out_dir: Path) -> None:
    from rich.table import Table

    cert = manifest["certificate"]
    hold = cert["holdout"]
    table = Table(title=f"skipit: {manifest['layers']['original']} → {manifest['layers']['slim']} layers", show_header=False)
    table.add_row("removed layers", ", ".join(map(str, cert["layers"])))
    table.add_row("held-out KL (nats/token)", f"{hold['kl']['mean']:.4f}  (≤ {hold['kl']['hi']:.4f})")
    table.add_row("held-out top-1 agreement", f"{hold['top1']['mean']:.3f}  (≥ {hold['top1']['lo']:.3f})")
    table.add_row("forward passes", f"{cert['passes']['total']}")
    table.add_row("reload check", f"max |Δlogit| {manifest['reload_check']['max_abs_logit_error']:.2e}")
    table.add_row("output", f"{out_dir} (model/, skipit_manifest.json, README.md, report.html)")
    console.print(table)


def _oracle_table(console: Any, oracle: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="Spearman(score, held-out KL when removed alone)")
    table.add_column("score")
    table.add_column("rho", justify="right")
    for name, rho in oracle["spearman"].items():
        table.add_row(name, f"{rho:+.3f}")
    console.print(table)


def _run(args: argparse.Namespace, job: Callable[[Any, Any], Any]) -> int:
    from rich.console import Console
    from rich.logging import RichHandler

    from skipit.errors import SkipitError

    console = Console(stderr=True)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    try:
        with _sigterm_cleans_up(), _Progress(console) as progress:
            return job(progress, console)
    except SkipitError as exc:
        if args.debug:
            raise
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        console.print(f"[red]{'terminated' if terminated else 'interrupted'}[/]: nothing was written")
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        if args.debug:
            raise
        console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc}\nrerun with --debug for the traceback "
                      "and please report it", highlight=False, soft_wrap=True)
        return EXIT_CRASH


def _compress(args: argparse.Namespace) -> int:
    def job(progress: Any, console: Any) -> int:
        from skipit.pipeline import compress

        result = compress(args.model, args.out_dir, _options(args, compress=True), progress=progress)
        if args.json:
            validation = result.validation.as_dict() if result.validation else None
            print(json.dumps({**result.manifest, "validation": validation, "exports": result.exports}, default=str))
        else:
            _summary(console, result.manifest, result.out_dir)
            if result.validation is not None:
                console.print(result.validation.summary(), highlight=False)
        return result.exit_code

    return _run(args, job)


def _analyze(args: argparse.Namespace) -> int:
    def job(progress: Any, console: Any) -> int:
        from skipit.atomic import write_atomic
        from skipit.pipeline import analyze_model

        if args.out_json.exists() and not args.overwrite:
            from skipit.errors import OutputExistsError

            raise OutputExistsError(f"{args.out_json} already exists; pass --overwrite to replace it")
        report = analyze_model(args.model, _options(args, compress=False), progress=progress, with_oracle=args.oracle)
        write_atomic(args.out_json, json.dumps(report, indent=2))
        if args.json:
            print(json.dumps(report))
        else:
            console.print(f"ranking (most redundant first): {report['ranking']}")
            if "oracle" in report:
                _oracle_table(console, report["oracle"])
            console.print(f"wrote {args.out_json}")
        return EXIT_OK

    return _run(args, job)


def _export(args: argparse.Namespace) -> int:
    def job(progress: Any, console: Any) -> int:
        from skipit.exporters.export import build_engines, export_onnx

        if args.trt:
            engines = build_engines(args.source, args.dest, profiles=args.profiles, precision=args.precision,
                                    max_context=args.max_context, timing_cache=args.timing_cache, opset=args.opset)
            console.print("engines: " + ", ".join(str(e) for e in engines))
            return EXIT_OK
        from skipit.exporters.onnx_text import OnnxExportConfig

        config = OnnxExportConfig(opset=args.opset or 18, dtype=args.dtype, exporter=args.exporter, backend=args.backend,
                                  overwrite=args.overwrite)
        progress("stage", {"name": f"exporting {args.source} to ONNX"})
        graphs = export_onnx(args.source, args.dest, config)
        console.print("ONNX graphs (verified against torch with onnxruntime): " + ", ".join(str(g) for g in graphs.values()))
        return EXIT_OK

    return _run(args, job)


def _add_export_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="export a (slim) checkpoint to ONNX, or ONNX graphs to TensorRT engines",
                       description="skipit export MODEL_DIR OUT_DIR  → OUT_DIR/onnx/*.onnx + config/tokenizer files;  "
                       "skipit export OUT_DIR/onnx ENGINES_DIR --trt  → TensorRT engines (GPU machine).")
    p.add_argument("source", type=Path, help="checkpoint directory (ONNX) or ONNX export directory (--trt)")
    p.add_argument("dest", type=Path, help="output directory")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="ONNX precision (default fp32)")
    p.add_argument("--opset", type=int, help="ONNX opset (default 18, TensorRT-friendly)")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy", "auto"], help="torch.onnx route")
    _add_backend(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in DEST")
    g = p.add_argument_group("TensorRT (--trt)")
    g.add_argument("--trt", action="store_true", help="build TensorRT engines from the ONNX graphs in SOURCE")
    g.add_argument("--profiles", help="optimization profiles, e.g. prefill=1x1..1x2048,decode=1x1..4x1 (batch x sequence)")
    g.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    g.add_argument("--max-context", type=int, help="longest past+sequence (default: max_position_embeddings)")
    g.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file (read and updated)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skipit", description="Remove decoder layers that measurably do nothing.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compress", help="certify, remove and save (same as skipit-compress)")
    _add_compress_args(p)
    p.set_defaults(func=_compress)
    p = sub.add_parser("analyze", help="per-layer scores only, no rewrite")
    p.add_argument("model", type=Path)
    p.add_argument("out_json", type=Path)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--oracle", action="store_true",
                   help="also remove each layer alone and report the Spearman correlation of each score with the real damage")
    _add_common(p)
    p.set_defaults(func=_analyze)
    _add_export_parser(sub)
    from skipit.validators.cli_validate import add_validate_parser

    add_validate_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``skipit``."""
    args = build_parser().parse_args(argv)
    return args.func(args)


def compress_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``skipit-compress`` (``skipit compress``)."""
    parser = argparse.ArgumentParser(prog="skipit-compress", description="Certify, remove and save decoder layers.")
    _add_compress_args(parser)
    return _compress(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
