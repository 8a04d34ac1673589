"""Which lever moves healing on the real SmolLM2-135M: more trained layers, more steps, or more text?

One removed set is healed as ``skipit-compress --heal`` does (KL distillation toward the original on the
whole calibration split, AdamW lr 1e-4), once per variant, and measured on the held-out split; the trained
weights are put back between variants. "More text" comes from the model itself or from a file: with
``--generate N`` the original writes N continuations of the calibration texts' first ``--prompt`` tokens
(plain sampling, temperature 1); ``--heal-data FILE.jsonl`` is read as ``skipit-compress --heal-data`` reads it
(``prose_corpus.py`` writes one). Either joins the healing data with the original's log-probs as teacher.
The held-out and test splits are never seen.

    python benchmarks/heal_levers.py [--removed 14,16,17,18] [--generate 128] [--heal-data FILE.jsonl] \
        [--variants '[{"steps": 80}, {"steps": 80, "scope": "all"}]']

Printed per variant: held-out KL (its one-sided 95 % upper bound) · top-1, seconds of healing, and the
training KL over the first and last 7 steps (a last figure far below the held-out KL says: too little text).

Measured 2026-12-03 (idle, 2 cores): ``--generate 128 --variants '[{"steps": 80, "scope": "all"}]'``: written
in 170 s; held-out KL 0.495 → 0.323 (0.378) · top-1 0.686 in 374 s; training KL 0.379 → 0.128. Without the
written text (frontier.py's run of that day) the same healing gives 0.329.
``--heal-data prose.jsonl`` (``prose_corpus.py``: 640 passages of other English text), same day, idle: default scope
0.363 (400 s), every layer 0.326 (656 s), every layer for 160 steps 0.330 (1260 s; training KL 0.347 → 0.174).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from frontier import measure, smollm2

from skipit.compressor.analyze import run_pass
from skipit.compressor.arch import decoder_spec
from skipit.compressor.batches import encode
from skipit.compressor.calibration import DataOptions, Sample, load_calibration, read_jsonl
from skipit.compressor.heal import HealConfig, build_heal_data, heal_
from skipit.compressor.loading import load_model


def generated(model, tokenizer, prompts: list[Sample], n: int, prompt_tokens: int, length: int) -> list[Sample]:
    """``n`` texts of ``length`` tokens sampled from ``model``, each continuing a prompt's first tokens."""
    out: list[Sample] = []
    with torch.inference_mode():
        for start in range(0, n, 8):
            group = [prompts[(start + i) % len(prompts)] for i in range(min(8, n - start))]
            ids = torch.stack([torch.tensor(tokenizer(s.text)["input_ids"][:prompt_tokens]) for s in group])
            new = length - prompt_tokens
            seqs = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                  top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new)
            out += [Sample(tokenizer.decode(s, skip_special_tokens=True), domain=p.domain, origin="generated")
                    for p, s in zip(group, seqs)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--removed", default="14,16,17,18")
    parser.add_argument("--holdout-samples", type=int, default=48)
    parser.add_argument("--generate", type=int, default=0, metavar="N", help="texts the original writes for healing")
    parser.add_argument("--prompt", type=int, default=16, help="tokens of a calibration text each one continues")
    parser.add_argument("--length", type=int, default=160, help="tokens per written text (the built-in: 90–159)")
    parser.add_argument("--heal-data", type=Path, metavar="FILE.jsonl",
                        help="more text for healing, as skipit-compress --heal-data reads it (prose_corpus.py writes one)")
    parser.add_argument("--variants", default='[{"steps": 80}, {"steps": 80, "scope": "all"}]',
                        help="JSON list of HealConfig fields, one healing each")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(smollm2())
    model, spec, tok = loaded.model, decoder_spec(loaded.model), loaded.processor
    data = load_calibration(None)

    def enc(samples):
        return encode(samples, tok, spec, batch_size=DataOptions.batch_size, max_length=DataOptions.max_length)

    cal, hold = enc(data.split("calibration")), enc(data.split("holdout")[: args.holdout_samples])
    cal_ref = run_pass(model, spec, cal, keep_reference=True, layer_scores=False).reference
    hold_ref = run_pass(model, spec, hold, keep_reference=True, layer_scores=False).reference
    removed = [int(x) for x in args.removed.split(",")]
    before = measure(model, spec, hold, hold_ref, removed)
    print(f"removed {removed}: unhealed held-out KL {before['kl']:.3f} ({before['kl_hi']:.3f}) · top-1 {before['top1']:.3f}")
    written: list[Sample] = []
    if args.generate:
        t = time.perf_counter()
        written = generated(model, tok, data.split("calibration"), args.generate, args.prompt, args.length)
        print(f"the original wrote {args.generate} texts of {args.length} tokens in {time.perf_counter() - t:.0f} s")
    given = read_jsonl(args.heal_data) if args.heal_data else []
    if given:
        print(f"--heal-data {args.heal_data}: {len(given)} texts")
    extra = enc(written + given) if written or given else []
    heal_data = build_heal_data(model, spec, cal, cal_ref, extra)
    for fields in json.loads(args.variants):
        result = heal_(model, spec, removed, heal_data, HealConfig(**fields))
        try:
            after = measure(model, spec, hold, hold_ref, removed)
        finally:
            result.undo(model)
        first, last = result.losses[:7], result.losses[-7:]
        print(f"{json.dumps(fields)} (+{len(written)} written, +{len(given)} given): "
              f"held-out KL {after['kl']:.3f} ({after['kl_hi']:.3f}) · "
              f"top-1 {after['top1']:.3f} in {result.seconds:.0f} s; training KL "
              f"{sum(first) / len(first):.3f} → {sum(last) / len(last):.3f}")


if __name__ == "__main__":
    main()
