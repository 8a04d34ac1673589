"""The report's sections, built once as data (:class:`Section`: a paragraph, a table, plots) from the manifest and
the optional validation, speed and frontier dicts; :mod:`skipit.report.render` renders them twice."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

Row = dict[str, Any]
Columns = Sequence[tuple[str, str]]  # (key in the row, column header)


@dataclass
class Section:
    """One part of the report, rendered the same way to Markdown and HTML.

    ``highlight`` names a boolean column: rows where it is true are emphasised (removed layers).
    Columns whose values are all None are left out (e.g. vision columns for a text-only model).
    """

    title: str
    text: str = ""
    rows: list[Row] = field(default_factory=list)
    columns: Columns = ()
    highlight: str | None = None
    plots: list[str] = field(default_factory=list)


def build_sections(
    manifest: dict[str, Any],
    validation: dict[str, Any] | None,
    speed: dict[str, Any] | None,
    frontier: list[Row],
    frontier_is_own: bool,
    plots: set[str],
) -> list[Section]:
    """All sections in reading order; optional inputs that are absent leave their section out."""
    sections = [certificate_section(manifest)]
    if manifest.get("size"):
        sections.append(size_section(manifest["size"]))
    sections.append(conditions_section(manifest, plots))
    if validation is not None:
        sections.append(parity_section(validation))
    if speed is not None:
        sections.append(speed_section(speed, plots))
    if frontier:
        sections.append(frontier_section(frontier, frontier_is_own, plots))
    sections.append(provenance_section(manifest))
    return sections


def certificate_section(manifest: dict[str, Any]) -> Section:
    """The certificate: what was removed, the bound asked for and what the held-out split measured."""
    cert, layers = manifest["certificate"], manifest["layers"]
    hold, policy = cert["holdout"], cert["policy"]
    conf = f"{policy['confidence']:.0%}"
    max_kl = policy.get("max_kl")
    rows = [
        ("removed layers (original numbering)", layers["removed"]),
        ("removal order", layers.get("removal_order")),
        ("decoder layers", f"{layers['original']} → {layers['slim']}"),
        ("requested KL bound (nats/token)", "none (layer budget only)" if max_kl is None else max_kl),
        ("layer budget", policy.get("max_layers")),
        ("held-out mean KL(original‖slim)", hold["kl"]["mean"]),
        (f"held-out KL upper bound ({conf}, one-sided)", hold["kl"]["hi"]),
        ("held-out top-1 agreement", hold["top1"]["mean"]),
        (f"top-1 lower bound ({conf})", hold["top1"]["lo"]),
        ("held-out samples / text tokens", f"{hold['kl']['n']} / {hold.get('tokens', '?')}"),
        ("forward passes (calibration + held-out)",
         f"{cert['passes']['calibration']} + {cert['passes']['holdout']} = {cert['passes']['total']}"),
    ]
    return Section("Certificate", cert.get("statement", ""), [{"item": k, "value": v} for k, v in rows],
                   [("item", ""), ("value", "")])


def conditions_section(manifest: dict[str, Any], plots: set[str]) -> Section:
    """Per layer: each measured condition, the verified end-to-end KL and whether the layer went."""
    columns = [("layer", "layer"), ("geometric", "geometric (cos dist)"), ("proximal", "proximal (tail)"),
               ("informational", "informational (lens KL)"), ("vision_geometric", "vision geometric"),
               ("vision_attention", "vision attention"), ("cross_modal_ok", "cross-modal ok"),
               ("verified_kl_hi", "verified KL ≤"), ("removed", "removed")]
    text = ("Scores of the analysis pass on the calibration split, before any removal (lower = more removable). "
            "Verified KL is the upper confidence bound of the end-to-end KL measured when the layer was "
            "actually removed during selection (— where it was never tried). Error bars in the plots are "
            "bootstrap intervals over samples; removed layers are red, protected layers grey.")
    shown: list[str] = [p for p in ("text_scores", "vision_scores") if p in plots]
    return Section("Conditions per layer", text, manifest["certificate"]["conditions"], columns, "removed", shown)


def size_section(size: dict[str, Any]) -> Section:
    """Parameters and weight bytes, original against slim."""
    params, files = size["parameters"], size["bytes"]
    rows: list[Row] = [{"what": "parameters", "original": params["original"], "slim": params["slim"],
                        "reduction": _share(params["original"], params["slim"])},
                       {"what": "weights on disk, model/ (bytes)", "original": files["source"], "slim": files["model"],
                        "reduction": _share(files["source"], files["model"])}]
    if "model.gguf" in files:
        rows.append({"what": "weights on disk, model.gguf (bytes)", "original": files["source"],
                     "slim": files["model.gguf"], "reduction": _share(files["source"], files["model.gguf"])})
    text = "Weights on disk compare the input's weight files with the output's (dtype and quantization included)."
    return Section("Size", text, rows, [("what", ""), ("original", "original"), ("slim", "slim"),
                                        ("reduction", "reduction")])


def _share(original: int, slim: int) -> str:
    return f"{1 - slim / original:.1%}" if original else "—"


#: the measured parity figures shown for the test split: (key path in validation["parity"], label)
PARITY_FIGURES = (
    (("logits", "kl"), "KL(original‖slim), nats/token"),
    (("logits", "top1"), "top-1 agreement"),
    (("logits", "ppl_original"), "perplexity, original"),
    (("logits", "ppl_slim"), "perplexity, slim"),
    (("logits", "ppl_ratio"), "perplexity ratio slim / original"),
    (("generation", "token_match"), "greedy token match"),
    (("generation", "sequence_match"), "greedy sequence match"),
)


def parity_section(validation: dict[str, Any]) -> Section:
    """Parity on the evaluation split: each measured figure with its interval, then every check and its verdict."""
    checks = validation.get("checks", [])
    passed = sum(bool(c.get("passed")) for c in checks)
    parity, data = validation.get("parity") or {}, validation.get("data") or {}
    rows: list[Row] = []
    for (part, key), label in PARITY_FIGURES:
        est = (parity.get(part) or {}).get(key)
        if isinstance(est, dict) and est.get("mean") is not None:
            rows.append({"name": label, "value": est["mean"], "lo": est.get("lo"), "hi": est.get("hi"), "kind": "measured"})
    where = f"the {data['split']} split" if data.get("split") else "the evaluation data"
    text = f"Measured on {where}. {passed} of {len(checks)} checks passed."
    rows += checks
    return Section("Parity", text, rows, _columns(rows, first=("name", "value", "lo", "hi")))


def speed_section(speed: dict[str, Any], plots: set[str]) -> Section:
    """Latency per runner (median and spread)."""
    runners = speed.get("runners", [])
    context = ", ".join(f"{k}: {v}" for k, v in speed.items() if k != "runners" and not isinstance(v, (dict, list)))
    return Section("Speed", context, runners, _columns(runners, first=("runner", "median_ms")),
                   plots=["speed"] if "speed" in plots else [])


def frontier_section(frontier: list[Row], own: bool, plots: set[str]) -> Section:
    """Quality against layers removed, per method."""
    text = ("skipit's own path: each accepted selection step (calibration split) and the certified set "
            "(held-out split)." if own else "Quality against the number of removed layers, per method.")
    return Section("Quality frontier", text, frontier, _columns(frontier, first=("method", "k")),
                   plots=["frontier"] if "frontier" in plots else [])


def provenance_section(manifest: dict[str, Any]) -> Section:
    """Where the model and data came from and what made the output."""
    src, cal = manifest.get("source", {}), manifest.get("calibration", {})
    rows = [("source", src.get("path")), ("architecture", manifest.get("architecture")),
            ("calibration data", cal.get("description")), ("split sizes", cal.get("split_sizes")),
            ("reload check: max |Δlogit|", manifest.get("reload_check", {}).get("max_abs_logit_error")),
            ("created", manifest.get("created")), ("versions", manifest.get("versions"))]
    return Section("Provenance", "", [{"item": k, "value": v} for k, v in rows], [("item", ""), ("value", "")])


def _columns(rows: list[Row], first: Sequence[str] = ()) -> Columns:
    """Columns for rows whose keys are not fixed: ``first`` keys, then every other key in order of appearance."""
    keys = [k for k in first if any(k in r for r in rows)]
    for r in rows:
        keys += [k for k in r if k not in keys]
    return [(k, k.replace("_", " ")) for k in keys]


def certificate_path(manifest: dict[str, Any]) -> list[Row]:
    """Frontier rows from the certificate alone: accepted selection steps, then the certified set."""
    cert = manifest["certificate"]
    rows: list[Row] = [
        {"method": "skipit selection (calibration)", "k": len(s["layers"]), "layers": s["layers"],
         "kl": s["kl"], "kl_hi": s["kl_hi"], "top1": s["top1"]}
        for s in cert.get("steps", []) if s.get("accepted")
    ]
    hold = cert["holdout"]
    nll = hold.get("nll", {}).get("mean")
    rows.append({"method": "skipit certified (held-out)", "k": len(cert["layers"]), "layers": cert["layers"],
                 "kl": hold["kl"]["mean"], "kl_hi": hold["kl"]["hi"], "top1": hold["top1"]["mean"],
                 "ppl": None if nll is None else math.exp(nll), "passes": cert["passes"]["total"]})
    return rows
