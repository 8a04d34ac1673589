"""``skipit export MODEL_DIR OUT_DIR`` (ONNX) and ``skipit export OUT_DIR/onnx ENGINES --trt`` (TensorRT)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from skipit.cli.runner import EXIT_CODES_HELP, Progress, add_output_flags, dtype_arg, run_job

EXPORT_EXAMPLES = """examples:
  skipit export out/model out/onnx                       # merged decoder with KV cache, verified with onnxruntime
  skipit export out/model out/onnx16 --dtype float16
  skipit export out/onnx out/engines --trt --profiles prefill=1x1..1x2048,decode=1x1..4x1   # GPU + TensorRT
"""
#: ``--dtype`` (canonical torch names) → the ONNX exporter's precision names
_ONNX_DTYPES = {"float32": "fp32", "float16": "fp16"}


def export_command(args: argparse.Namespace) -> int:
    """Handler of ``skipit export``."""

    def job(progress: Progress, console: Any) -> int:
        from skipit import extras
        from skipit.errors import ExitCode, InvalidOptionError
        from skipit.exporters.export import build_engines, export_onnx

        if args.trt:
            engines = build_engines(args.source, args.dest, profiles=args.profiles, precision=args.precision,
                                    max_context=args.max_context, timing_cache=args.timing_cache, opset=args.opset)
            console.print("engines: " + ", ".join(str(e) for e in engines))
            return ExitCode.OK
        from skipit.exporters.onnx import OnnxExportConfig

        if args.dtype not in _ONNX_DTYPES:
            raise InvalidOptionError(f"ONNX export writes float32 or float16, not {args.dtype}")
        extras.require(*extras.for_onnx(args.backend, args.exporter))
        config = OnnxExportConfig(opset=args.opset or 18, dtype=_ONNX_DTYPES[args.dtype], exporter=args.exporter,
                                  backend=args.backend, overwrite=args.overwrite)
        progress("stage", {"name": f"exporting {args.source} to ONNX"})
        graphs = export_onnx(args.source, args.dest, config)
        if args.json:
            import json

            print(json.dumps({k: str(v) for k, v in graphs.items()}))
        elif not args.quiet:
            console.print("ONNX graphs (verified against torch with onnxruntime): " + ", ".join(str(g) for g in graphs.values()))
        return ExitCode.OK

    return run_job(args, job)


def add_export_parser(sub: Any) -> None:
    from skipit.cli.compress import add_backend

    p = sub.add_parser("export", help="export a (slim) checkpoint to ONNX, or ONNX graphs to TensorRT engines",
                       description="skipit export MODEL_DIR OUT_DIR  → OUT_DIR/onnx/*.onnx + config/tokenizer files;  "
                       "skipit export OUT_DIR/onnx ENGINES_DIR --trt  → TensorRT engines (GPU machine).",
                       epilog=EXPORT_EXAMPLES + "\n" + EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="checkpoint directory (ONNX) or ONNX export directory (--trt)")
    p.add_argument("dest", type=Path, help="output directory")
    p.add_argument("--dtype", default="float32", type=dtype_arg, help="ONNX precision: float32 (default) or float16")
    p.add_argument("--opset", type=int, help="ONNX opset (default 18, TensorRT-friendly)")
    add_backend(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in DEST")
    g = p.add_argument_group("TensorRT (--trt)")
    g.add_argument("--trt", action="store_true", help="build TensorRT engines from the ONNX graphs in SOURCE")
    g.add_argument("--profiles", help="optimization profiles, e.g. prefill=1x1..1x2048,decode=1x1..4x1 (batch x sequence)")
    g.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    g.add_argument("--max-context", type=int, help="longest past+sequence (default: max_position_embeddings)")
    g.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file (read and updated)")
    add_output_flags(p)
    p.set_defaults(func=export_command)
