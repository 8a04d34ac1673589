"""``skipit-compress MODEL OUT`` (= ``skipit compress``) and ``skipit analyze MODEL OUT_JSON``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from skipit.cli.runner import EXIT_CODES_HELP, Progress, add_output_flags, dtype_arg, run_job

COMPRESS_EXAMPLES = """examples:
  skipit-compress ./SmolLM2-135M out --max-kl 0.8 --max-layers 4
  skipit-compress model.Q4_1.gguf out --max-layers 2 --heal          # GGUF in (→ out/model.gguf); heal
  skipit-compress HuggingFaceTB/SmolLM2-135M-Instruct out --max-layers 2   # a Hub id (HF cache; HF_HUB_OFFLINE)
  skipit-compress ./llava out --calib data.jsonl --export onnx --validate   # the whole pipeline, as a CI gate
"""


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,-1, got {text!r}") from None


def _share_or_none(text: str) -> float | None:
    """A share in (0, 1], or ``none``."""
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1] or 'none', got {text!r}")
    return value


def add_common(p: argparse.ArgumentParser) -> None:
    """Model loading and calibration-data options shared by ``compress`` and ``analyze``."""
    from skipit.compressor.analyze import AnalyzeConfig
    from skipit.compressor.loading import LoadOptions
    from skipit.pipeline import DataOptions

    g = p.add_argument_group("model loading")
    add_placement_flags(g)
    g.add_argument("--dtype", default=LoadOptions.dtype, type=dtype_arg,
                   help=f"weights dtype during measurement: float32, float16, bfloat16, auto (default: {LoadOptions.dtype})")
    g.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model dir")
    g.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights")
    g = p.add_argument_group("calibration data")
    g.add_argument("--calib", type=Path, help='JSONL with {"text": ...} or {"image": path, "text": ...} lines '
                   "(default: built-in prose, plus drawn images for VLMs)")
    g.add_argument("--calib-limit", type=int, help="use at most this many samples")
    g.add_argument("--batch-size", type=int, default=DataOptions.batch_size)
    g.add_argument("--max-length", type=int, default=DataOptions.max_length,
                   help=f"longest text sample in tokens; shorter texts keep their own length (default: {DataOptions.max_length})")
    g.add_argument("--eps", type=float, default=AnalyzeConfig.eps,
                   help="cosine-distance threshold of the proximal condition")
    add_output_flags(p)


def add_placement_flags(g: Any) -> None:
    """``--device``, ``--max-memory``, ``--offload-dir`` (shared with ``skipit validate``)."""
    g.add_argument("--device", default="cpu",
                   help="torch device: cpu, cuda, cuda:1 …, or auto: accelerate places the model over the GPUs, then "
                        "the CPU, then disk, within --max-memory (default: cpu)")
    g.add_argument("--max-memory", metavar="DEVICE=SIZE,…",
                   help="with --device auto: the most memory per device, e.g. 0=20GiB,1=20GiB,cpu=60GiB; what does "
                        "not fit is offloaded to disk (default: the free memory)")
    g.add_argument("--offload-dir", type=Path, metavar="DIR",
                   help="with --device auto: where weights offloaded to disk are written (a temporary subfolder; "
                        "default: beside the output)")


def add_backend(p: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--exporter``: which ONNX exporter, and which torch.onnx route."""
    p.add_argument("--backend", default="torch", choices=["torch", "optimum"],
                   help="ONNX exporter: skipit's own torch.onnx route (default) or optimum's "
                        "(text decoders; needs optimum-onnx, i.e. transformers<4.58)")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy", "auto"],
                   help="torch.onnx route of --backend torch: dynamo (default), legacy (TorchScript; faster to "
                        "export), auto (dynamo, then legacy)")


def add_compress_args(p: argparse.ArgumentParser) -> None:
    from skipit.compressor.certificate import CertifyPolicy
    from skipit.compressor.heal import HealConfig

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = COMPRESS_EXAMPLES + "\n" + EXIT_CODES_HELP
    p.add_argument("model", help="model directory (config.json + safetensors), a .gguf file, or a Hugging Face Hub id "
                                 "(org/name, org/name/file.gguf)")
    p.add_argument("out_dir", type=Path, help="output directory (model/, skipit_manifest.json, README.md, report.html)")
    p.add_argument("--revision", help="Hub id only: branch, tag or commit (default: main)")
    p.add_argument("--cache-dir", type=Path, help="Hub id only: the Hugging Face cache folder (default: HF_HOME's)")
    g = p.add_argument_group("certificate")
    g.add_argument("--max-kl", type=float, default=None,
                   help="bound on mean KL(original‖slim) in nats/token on held-out data, at --confidence "
                   f"(default {CertifyPolicy.max_kl} unless only --max-layers is given)")
    g.add_argument("--max-layers", type=int, help="remove at most this many layers")
    g.add_argument("--min-top1", type=float, help="lower bound on top-1 agreement with the original")
    g.add_argument("--protect", type=_int_list, default=CertifyPolicy.protect, help="layers never removed (default: 0,-1)")
    g.add_argument("--confidence", type=float, default=CertifyPolicy.confidence)
    g.add_argument("--bound", choices=["worst-domain", "pooled"], default=CertifyPolicy.bound,
                   help="what the held-out check certifies: the worst domain's upper bound (default; domains come "
                        "from the built-in data or a JSONL \"domain\" field) or the pooled mean's")
    g.add_argument("--max-vision-attention", type=_share_or_none, default=CertifyPolicy.max_vision_attention,
                   metavar="SHARE",
                   help="cross-modal condition (VLMs): a layer whose text tokens give more than SHARE of their "
                        f"attention to image tokens is never removed (default {CertifyPolicy.max_vision_attention}; "
                        "'none' turns the condition off)")
    g.add_argument("--probe-width", type=int,
                   help="best-ranked candidates tried per step: screened on a quarter of the calibration samples, the "
                        f"best {CertifyPolicy.verify_top} verified on all of them (default {CertifyPolicy.probe_width}; "
                        "1 = fastest)")
    g = p.add_argument_group("healing (distil the slim model toward the original after removal)")
    g.add_argument("--heal", action="store_true",
                   help="heal: choose layers under --heal-slack × the bound, train the layers next to each gap toward "
                        "the original's next-token distributions, then certify the healed model on held-out data")
    g.add_argument("--heal-data", type=Path, help="extra unlabeled JSONL for healing (same format as --calib)")
    g.add_argument("--heal-steps", type=int, help=f"optimizer steps, one calibration batch each (default {HealConfig.steps})")
    g.add_argument("--heal-minutes", type=float, help="stop healing after this many minutes")
    g.add_argument("--heal-lr", type=float, help=f"learning rate (default {HealConfig.lr:g})")
    g.add_argument("--heal-scope", choices=["adjacent", "all"], help="train the layers next to each gap (default) or all")
    g.add_argument("--heal-method", choices=["full", "lora"], help="full weights (default) or low-rank updates merged back")
    g.add_argument("--heal-slack", type=float,
                   help=f"selection bound before healing, as a multiple of --max-kl (default {HealConfig.select_slack:g})")
    p.add_argument("--save-dtype", default="source", type=lambda t: t if t == "source" else dtype_arg(t),
                   help="dtype of the saved checkpoint: source (default: the input's own; bfloat16 for a quantized "
                        "GGUF), float32, float16, bfloat16; the certificate is measured in it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it holds an earlier skipit output (never any other folder)")
    p.add_argument("--export", type=lambda t: tuple(x for x in t.split(",") if x), default=(),
                   help="also export: onnx, or onnx,trt (engines need TensorRT and a GPU; skipped with a message otherwise)")
    p.add_argument("--validate", action="store_true",
                   help="run the `skipit validate` gate on the untouched test split (and ONNX parity); its exit code")
    add_backend(p)
    add_common(p)


def _heal_config(args: argparse.Namespace) -> Any:
    from skipit.compressor.heal import HealConfig

    given = {"steps": args.heal_steps, "minutes": args.heal_minutes, "lr": args.heal_lr, "scope": args.heal_scope,
             "method": args.heal_method, "select_slack": args.heal_slack}
    return HealConfig(**{k: v for k, v in given.items() if v is not None})


def options_from(args: argparse.Namespace, compress: bool) -> Any:
    """The :class:`~skipit.pipeline.CompressOptions` for parsed ``compress`` / ``analyze`` arguments."""
    from skipit.compressor.analyze import AnalyzeConfig
    from skipit.compressor.certificate import CertifyPolicy
    from skipit.compressor.loading import LoadOptions
    from skipit.pipeline import CompressOptions, DataOptions

    policy = CertifyPolicy()
    if compress:
        # neither bound nor budget: the policy's default bound; a budget alone: no KL bound
        kw = {} if args.max_kl is None and args.max_layers is None else {"max_kl": args.max_kl}
        width = {} if args.probe_width is None else {"probe_width": args.probe_width}
        policy = CertifyPolicy(**kw, max_layers=args.max_layers, min_top1=args.min_top1, protect=args.protect,
                               confidence=args.confidence, bound=args.bound,
                               max_vision_attention=args.max_vision_attention, **width)
    return CompressOptions(
        heal=_heal_config(args) if getattr(args, "heal", False) else None,
        heal_data=getattr(args, "heal_data", None),
        save_dtype=getattr(args, "save_dtype", "source"),
        revision=getattr(args, "revision", None),
        cache_dir=getattr(args, "cache_dir", None),
        load=LoadOptions(args.dtype, args.device, args.trust_remote_code, args.allow_pickle,
                         max_memory=args.max_memory, offload_dir=args.offload_dir),
        data=DataOptions(args.calib, args.calib_limit, args.batch_size, args.max_length),
        policy=policy,
        analyze=AnalyzeConfig(eps=args.eps),
        overwrite=getattr(args, "overwrite", False),
        export=getattr(args, "export", ()),
        backend=getattr(args, "backend", "torch"),
        exporter=getattr(args, "exporter", "dynamo"),
        validate=getattr(args, "validate", False),
    )


def _summary(console: Any, manifest: dict[str, Any], out_dir: Path) -> None:
    from rich.table import Table

    cert = manifest["certificate"]
    hold = cert["holdout"]
    table = Table(title=f"skipit: {manifest['layers']['original']} → {manifest['layers']['slim']} layers", show_header=False)
    table.add_row("removed layers", ", ".join(map(str, cert["layers"])))
    table.add_row("held-out KL (nats/token)", f"{hold['kl']['mean']:.4f}  (≤ {hold['kl']['hi']:.4f})")
    table.add_row("held-out top-1 agreement", f"{hold['top1']['mean']:.3f}  (≥ {hold['top1']['lo']:.3f})")
    bound = hold.get("bound") or {}
    if bound.get("kind") == "worst-domain":
        table.add_row("certified (worst domain)", f"KL ≤ {bound['kl_hi']:.4f} ({bound['domain']}, "
                                                  f"{len(hold['domains'])} domains)")
    if hold.get("longest_context"):
        table.add_row("longest context covered", f"{hold['longest_context']} tokens")
    if cert.get("healing"):
        before = cert["healing"]["holdout_before"]["kl"]["mean"]
        table.add_row("healing", f"held-out KL {before:.4f} → {hold['kl']['mean']:.4f} "
                                 f"({cert['healing']['steps']} steps, {cert['healing']['seconds']:.0f} s)")
    table.add_row("forward passes", f"{cert['passes']['total']}")
    table.add_row("reload check", f"max |Δlogit| {manifest['reload_check']['max_abs_logit_error']:.2e}")
    table.add_row("output", f"{out_dir} (model/, skipit_manifest.json, README.md, report.html)")
    console.print(table)


def compress_command(args: argparse.Namespace) -> int:
    """Handler of ``skipit-compress``: run the pipeline, print the summary (or JSON); the exit code."""

    def job(progress: Progress, console: Any) -> int:
        from skipit.pipeline import compress

        result = compress(args.model, args.out_dir, options_from(args, compress=True), progress=progress)
        if args.json:
            validation = result.validation.as_dict() if result.validation else None
            print(json.dumps({**result.manifest.as_dict(), "validation": validation, "exports": result.exports}, default=str))
        elif not args.quiet:
            _summary(console, result.manifest.as_dict(), result.out_dir)
            if result.validation is not None:
                console.print(result.validation.summary(), highlight=False)
        return result.exit_code

    return run_job(args, job)


def _oracle_table(console: Any, oracle: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="Spearman(score, held-out KL when removed alone)")
    table.add_column("score")
    table.add_column("rho", justify="right")
    for name, rho in oracle["spearman"].items():
        table.add_row(name, f"{rho:+.3f}")
    console.print(table)


def analyze_command(args: argparse.Namespace) -> int:
    """Handler of ``skipit analyze``."""

    def job(progress: Progress, console: Any) -> int:
        from skipit.atomic import write_atomic
        from skipit.errors import ExitCode, OutputExistsError
        from skipit.pipeline import analyze_model

        if args.out_json.exists() and not args.overwrite:
            raise OutputExistsError(f"{args.out_json} already exists; pass --overwrite to replace it")
        report = analyze_model(args.model, options_from(args, compress=False), progress=progress, with_oracle=args.oracle)
        write_atomic(args.out_json, json.dumps(report, indent=2))
        if args.json:
            print(json.dumps(report))
        elif not args.quiet:
            console.print(f"ranking (most redundant first): {report['ranking']}")
            if "oracle" in report:
                _oracle_table(console, report["oracle"])
            console.print(f"wrote {args.out_json}")
        return ExitCode.OK

    return run_job(args, job)


def add_analyze_parser(sub: Any) -> None:
    p = sub.add_parser("analyze", help="per-layer scores only, no rewrite", epilog=EXIT_CODES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model directory, .gguf file or Hugging Face Hub id")
    p.add_argument("out_json", type=Path)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--oracle", action="store_true",
                   help="also remove each layer alone and report the Spearman correlation of each score with the real damage")
    add_common(p)
    p.set_defaults(func=analyze_command)
