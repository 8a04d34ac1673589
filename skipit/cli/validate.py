"""``skipit validate ORIGINAL SLIM``: the argparse part of the CI gate (:mod:`skipit.validators.gate`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from skipit.cli.runner import EXIT_CODES_HELP, add_output_flags, dtype_arg, run_job

VALIDATE_EXAMPLES = """examples:
  skipit validate ./SmolLM2-135M out                         # parity on the untouched test split, certified bound
  skipit validate ./SmolLM2-135M out --onnx out/onnx --max-kl 0.3 --min-top1 0.7 --json gate.json
  skipit validate model.gguf out --lm-eval skipit_facts --max-acc-drop 0.1   # lm-eval accuracy, paired (skipit[eval])
  skipit validate ./orig out --lm-eval my_tasks/ --lm-eval-limit 200            # a folder (or YAML) of lm-eval tasks
"""


def add_validate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``validate`` subcommand to an ``argparse`` subparsers object and return its parser."""
    from skipit.cli.compress import add_placement_flags
    from skipit.validators.parity import ParityConfig

    p = subparsers.add_parser(
        "validate", help="check a slim model against the original (CI gate)",
        description="Compare a slim model with the original on held-out data and check bounds.",
        epilog=VALIDATE_EXAMPLES + "\n" + EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("original", help="original model: directory, .gguf file or Hub id (org/name, org/name/file.gguf)")
    p.add_argument("slim", type=Path, help="slim model directory (skipit's OUT_DIR or OUT_DIR/model)")
    p.add_argument("--data", type=Path, help="JSONL evaluation data (default: the data in the slim model's "
                   "skipit_manifest.json, else built-in)")
    p.add_argument("--split", default="test", choices=["test", "holdout", "calibration", "all"],
                   help="which split of the data (default: test, untouched by certification)")
    p.add_argument("--limit", type=int, help="use at most this many samples of the data (before splitting)")
    g = p.add_argument_group("bounds (a failed one sets the exit code)")
    g.add_argument("--max-kl", type=float, help="max mean KL(original‖slim), nats/token (default: the certified bound)")
    g.add_argument("--min-top1", type=float, help="min top-1 agreement with the original")
    g.add_argument("--min-speedup", type=float, help="min slim/original speedup, torch (measures speed; slow)")
    g.add_argument("--onnx", type=Path, help="exported ONNX model (dir or file) to compare with the slim torch model")
    g.add_argument("--onnx-atol", type=float, default=1e-3, help="max |Δlogit| of ONNX vs torch (default 1e-3)")
    g.add_argument("--max-acc-drop", type=float, help="max accuracy drop original − slim on each --lm-eval task, "
                   "a fraction (0.05 = five points)")
    g.add_argument("--point-estimates", action="store_true",
                   help="compare means with the bounds instead of the conservative ends of the 95%% intervals")
    g = p.add_argument_group("measurement")
    g.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per sample for generation match (0: skip)")
    g.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=None,
                   help="task accuracy on samples with an \"answer\" (default: when the data has answers)")
    g.add_argument("--lm-eval", metavar="TASKS", help="run lm-eval on both models: comma-separated task names "
                   "(skipit_facts ships with skipit; lm-eval's own need their data sets), task YAMLs or folders of them "
                   "(needs pip install 'skipit[eval]')")
    g.add_argument("--lm-eval-limit", type=int, metavar="N", help="at most N items per lm-eval task (default: all)")
    g.add_argument("--lm-eval-fewshot", type=int, metavar="K", help="few-shot examples per prompt (default: each task's)")
    g.add_argument("--seq-lens", default="32,128,256", help="prefill lengths for --min-speedup (default 32,128,256)")
    g.add_argument("--repeats", type=int, default=5, help="timed repeats per runner (default 5)")
    g = p.add_argument_group("model loading")
    g.add_argument("--revision", help="branch, tag or commit of an original given as a Hub id (default: main)")
    g.add_argument("--cache-dir", type=Path, help="Hugging Face cache for Hub ids (default: $HF_HOME/hub)")
    add_placement_flags(g)
    g.add_argument("--dtype", default="float32", type=dtype_arg, help="float32 (default), float16, bfloat16 or auto")
    g.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model dirs")
    g.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights")
    g.add_argument("--batch-size", type=int, default=ParityConfig.batch_size)
    g.add_argument("--max-length", type=int, default=ParityConfig.max_length,
                   help=f"longest sample in tokens (default: {ParityConfig.max_length})")
    add_output_flags(p, json_file=True)
    p.set_defaults(func=validate_command)
    return p


def gate_config(args: argparse.Namespace) -> Any:
    """The :class:`~skipit.validators.gate.GateConfig` for parsed ``validate`` arguments."""
    from skipit.compressor.loading import LoadOptions
    from skipit.errors import InvalidOptionError
    from skipit.validators.backend import BackendParityConfig
    from skipit.validators.gate import GateConfig
    from skipit.validators.parity import ParityConfig
    from skipit.validators.speed import SpeedConfig

    lm_eval = None
    if args.lm_eval is not None:
        from skipit.validators.lm_eval import LmEvalConfig

        lm_eval = LmEvalConfig.parse(args.lm_eval, limit=args.lm_eval_limit, max_acc_drop=args.max_acc_drop,
                                     num_fewshot=args.lm_eval_fewshot, batch_size=args.batch_size)
    else:
        for flag, value in (("--max-acc-drop", args.max_acc_drop), ("--lm-eval-limit", args.lm_eval_limit),
                            ("--lm-eval-fewshot", args.lm_eval_fewshot)):
            if value is not None:
                raise InvalidOptionError(f"{flag} applies to lm-eval tasks: add --lm-eval TASKS (e.g. --lm-eval skipit_facts)")
    try:
        seq_lens = tuple(int(x) for x in args.seq_lens.split(",") if x.strip())
    except ValueError:
        raise InvalidOptionError(
            f"--seq-lens expects comma-separated integers such as 32,128,256, got {args.seq_lens!r}") from None
    return GateConfig(
        data=args.data, split=args.split, limit=args.limit, max_kl=args.max_kl, min_top1=args.min_top1,
        min_speedup=args.min_speedup, onnx=args.onnx, conservative=not args.point_estimates,
        parity=ParityConfig(new_tokens=args.new_tokens, accuracy=args.accuracy, batch_size=args.batch_size,
                            max_length=args.max_length),
        backend=BackendParityConfig(atol=args.onnx_atol, device="auto" if args.device == "auto"
                                    else "cuda" if args.device.startswith("cuda") else "cpu"),
        speed=SpeedConfig(seq_lens=seq_lens, repeats=args.repeats),
        load=LoadOptions(args.dtype, args.device, args.trust_remote_code, args.allow_pickle,
                         max_memory=args.max_memory, offload_dir=args.offload_dir), lm_eval=lm_eval,
        revision=args.revision, cache_dir=args.cache_dir,
    )


def validate_command(args: argparse.Namespace) -> int:
    """Handler of ``skipit validate``: run the gate, print the summary, write ``--json``; return the exit code."""
    def job(progress: Any, console: Any) -> int:
        from skipit.atomic import write_atomic
        from skipit.validators.gate import validate

        from skipit import extras

        extras.require(*extras.for_model(args.original), *(["onnx"] if args.onnx else []))
        report = validate(args.original, args.slim, gate_config(args), progress=progress)
        if args.json is not None:
            write_atomic(args.json, json.dumps(report.as_dict(), indent=2))
        if not args.quiet:
            print(report.summary())
        return report.exit_code

    return run_job(args, job)
