"""The human-readable evidence of a run: ``report.json``, ``report.md`` and a self-contained ``report.html``.

Everything the report shows comes from plain dicts: the manifest (``skipit_manifest.json``), and
optionally the parity checks, the speed measurements and a quality frontier. Each section of the
report is built once as data (:class:`Section`: a paragraph, a table, plots) and rendered twice, to
Markdown and to HTML. The HTML embeds its plots as base64 PNG and its style inline, so it opens
offline, from an e-mail attachment or a CI artifact, with no external resource.

Inputs other than the manifest (all optional):

* ``validation``: ``{"checks": [{"name": str, "value": float, "bound": float, "passed": bool, ...}], ...}``
* ``speed``: ``{"runners": [{"runner": str, "median_ms": float, "lo_ms": float, "hi_ms": float, ...}], ...}``;
  the spread drawn around the median is ``lo_ms``/``hi_ms`` (or ``p10_ms``/``p90_ms``, ``min_ms``/``max_ms``).
* ``frontier``: ``[{"method": str, "k": int, "kl": float, "top1": float, "ppl": float, "passes": int}, ...]``;
  ``kl_hi`` adds an error bar. Without it, the report draws skipit's own path: the accepted selection
  steps (calibration split) and the certified set (held-out split).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

REPORT_FORMAT = "skipit-report/1"
PLOTS_DIR = "plots"
KEPT, REMOVED, PROTECTED = "#4c72b0", "#d62728", "#9e9e9e"
PLOT_CAPTIONS = {
    "text_scores": "Per-layer scores on text tokens (calibration split, before removal), bootstrap intervals.",
    "vision_scores": "Per-layer scores on vision tokens, and the share of text queries' attention on vision tokens.",
    "frontier": "Quality against the number of removed layers.",
    "speed": "Median latency per runner; error bars show the spread.",
}

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


# ----------------------------------------------------------------------------------------------
# entry point


def write_report(
    out_dir: Path,
    manifest: dict[str, Any],
    validation: dict[str, Any] | None = None,
    speed: dict[str, Any] | None = None,
    frontier: list[dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``report.html`` and ``plots/*.png`` into ``out_dir``.

    Returns the written paths: keys ``json``, ``md``, ``html`` and ``plot:<name>`` per plot.
    """
    out_dir = Path(out_dir)
    (out_dir / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    frontier_rows = frontier if frontier is not None else certificate_path(manifest)
    pngs = render_plots(manifest, speed, frontier_rows)
    written: dict[str, Path] = {}
    for name, data in pngs.items():
        written[f"plot:{name}"] = _write_atomic(out_dir / PLOTS_DIR / f"{name}.png", data)
    sections = build_sections(manifest, validation, speed, frontier_rows, frontier is None, set(pngs))
    title = _title(manifest)
    merged = {
        "format": REPORT_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "manifest": manifest,
        "validation": validation,
        "speed": speed,
        "frontier": frontier_rows,
        "plots": {name: f"{PLOTS_DIR}/{name}.png" for name in pngs},
    }
    written["json"] = _write_atomic(out_dir / "report.json", json.dumps(merged, indent=2, default=str).encode())
    written["md"] = _write_atomic(out_dir / "report.md", render_markdown(title, sections).encode())
    written["html"] = _write_atomic(out_dir / "report.html", render_html(title, sections, pngs).encode())
    log.info("report written to %s (%d plots)", out_dir / "report.html", len(pngs))
    return written


def _write_atomic(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _title(manifest: dict[str, Any]) -> str:
    layers = manifest["layers"]
    name = Path(manifest.get("source", {}).get("path", "model")).name
    return f"skipit report — {name}: {layers['original']} → {layers['slim']} decoder layers"


# ----------------------------------------------------------------------------------------------
# sections: one function each, returning data only


def build_sections(
    manifest: dict[str, Any],
    validation: dict[str, Any] | None,
    speed: dict[str, Any] | None,
    frontier: list[Row],
    frontier_is_own: bool,
    plots: set[str],
) -> list[Section]:
    """All sections in reading order; optional inputs that are absent leave their section out."""
    sections = [certificate_section(manifest), conditions_section(manifest, plots)]
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
    shown = [p for p in ("text_scores", "vision_scores") if p in plots]
    return Section("Conditions per layer", text, manifest["certificate"]["conditions"], columns, "removed", shown)


def parity_section(validation: dict[str, Any]) -> Section:
    """Parity checks: the measured value, the bound it had to meet and the verdict."""
    checks = validation.get("checks", [])
    passed = sum(bool(c.get("passed")) for c in checks)
    return Section("Parity", f"{passed} of {len(checks)} checks passed.", checks, _columns(checks, first=("name",)))


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


# ----------------------------------------------------------------------------------------------
# rendering: one table helper for both formats


def _cell(value: Any) -> str:
    """A value as table text (not yet escaped)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    return str(value)


def _visible(section: Section) -> Columns:
    return [(k, h) for k, h in section.columns if any(r.get(k) is not None for r in section.rows)]


def table_markdown(section: Section) -> str:
    """The section's rows as a Markdown table (highlighted rows in bold)."""
    cols = _visible(section)
    if not section.rows or not cols:
        return ""

    def md(s: str) -> str:
        return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    out = [line([md(h) for _, h in cols]), line(["---"] * len(cols))]
    for r in section.rows:
        bold = section.highlight is not None and bool(r.get(section.highlight))
        out.append(line([f"**{md(_cell(r.get(k)))}**" if bold else md(_cell(r.get(k))) for k, _ in cols]))
    return "\n".join(out)


def table_html(section: Section) -> str:
    """The section's rows as an HTML table; every value is escaped, highlighted rows get class ``hl``."""
    cols = _visible(section)
    if not section.rows or not cols:
        return ""
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for _, h in cols)
    thead = f"<thead><tr>{head}</tr></thead>" if any(h for _, h in cols) else ""  # key/value tables have none
    body = []
    for r in section.rows:
        cls = ' class="hl"' if section.highlight is not None and r.get(section.highlight) else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{e(_cell(r.get(k)))}</td>" for k, _ in cols) + "</tr>")
    return f"<table>{thead}<tbody>{''.join(body)}</tbody></table>"


def render_markdown(title: str, sections: list[Section]) -> str:
    """The whole report as Markdown; plots are linked from ``plots/``."""
    parts = [f"# {title}"]
    for s in sections:
        parts.append(f"## {s.title}")
        parts += [p for p in (s.text, table_markdown(s)) if p]
        parts += [f"![{name}]({PLOTS_DIR}/{name}.png)" for name in s.plots]
    return "\n\n".join(parts) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1120px;padding:16px 24px;color:#1d1d1f;background:#fff;line-height:1.45}
h1{font-size:1.5em;border-bottom:2px solid #d62728;padding-bottom:6px}h2{font-size:1.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f0f0f3}tbody tr:nth-child(even){background:#fafafa}tr.hl,tr.hl:nth-child(even){background:#fde2e1;font-weight:600}
figure{margin:10px 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
"""


def render_html(title: str, sections: list[Section], pngs: dict[str, bytes]) -> str:
    """The whole report as one HTML file: inline style, plots as base64 PNG, every value escaped."""
    e = html.escape
    parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
             f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>"]
    for s in sections:
        parts.append(f'<section id="{e(s.title.lower().replace(" ", "-"))}"><h2>{e(s.title)}</h2>')
        if s.text:
            parts.append(f"<p>{e(s.text)}</p>")
        parts.append(table_html(s))
        for name in s.plots:
            data = base64.b64encode(pngs[name]).decode("ascii")
            parts.append(f'<figure><img id="plot-{e(name)}" alt="{e(name)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{e(PLOT_CAPTIONS.get(name, name))}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# plots (matplotlib imported lazily; Figure + Agg canvas, no pyplot global state)


def render_plots(manifest: dict[str, Any], speed: dict[str, Any] | None, frontier: list[Row]) -> dict[str, bytes]:
    """PNG bytes per plot name; plots without data (no vision tokens, no speed) are left out."""
    makers: dict[str, Callable[[], Any]] = {
        "text_scores": lambda: plot_layer_scores(manifest, "text", [
            ("cos_dist", "geometric: cos distance"), ("tail", "proximal: P[dist > ε]"),
            ("lens_kl", "informational: logit-lens KL (nats)")]),
        "vision_scores": lambda: plot_layer_scores(manifest, "vision", [
            ("vision:cos_dist", "vision tokens: cos distance"),
            ("text:vision_attention", "text→vision attention share")]),
        "frontier": lambda: plot_frontier(frontier, manifest["certificate"]["policy"].get("max_kl")),
        "speed": lambda: plot_speed(speed),
    }
    out = {}
    for name, make in makers.items():
        fig = make()
        if fig is not None:
            out[name] = _png(fig)
    return out


def _figure(n_panels: int, height: float = 2.6) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, height * n_panels), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_panels, 1, squeeze=False)[:, 0]
    return fig, list(axes)


def _png(fig: Any) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _estimate(layer: Row, key: str, default_modality: str) -> dict[str, float] | None:
    modality, _, metric = key.rpartition(":")
    return layer.get(modality or default_modality, {}).get(metric)


def plot_layer_scores(manifest: dict[str, Any], modality: str, panels: list[tuple[str, str]]) -> Any | None:
    """One bar panel per metric over layers, with bootstrap error bars; removed layers red, protected grey.

    A panel key is ``metric`` (of ``modality``) or ``modality:metric``. Returns None when no panel has data.
    """
    cert = manifest["certificate"]
    layers = cert["initial_scores"]
    panels = [(k, t) for k, t in panels if any(_estimate(l, k, modality) for l in layers)]
    if not panels:
        return None
    from matplotlib.patches import Patch

    removed, protected = set(cert["layers"]), set(cert["policy"].get("protect_resolved", []))
    colors = [REMOVED if l["index"] in removed else PROTECTED if l["index"] in protected else KEPT for l in layers]
    fig, axes = _figure(len(panels))
    for ax, (key, title) in zip(axes, panels):
        idx, mean, err = [], [], [[], []]
        for l in layers:
            est = _estimate(l, key, modality) or {"mean": math.nan, "lo": math.nan, "hi": math.nan}
            idx.append(l["index"])
            mean.append(est["mean"])
            err[0].append(max(est["mean"] - est["lo"], 0.0))
            err[1].append(max(est["hi"] - est["mean"], 0.0))
        ax.bar(idx, mean, yerr=err, color=colors, capsize=3, ecolor="#333")
        for i in removed:
            ax.axvspan(i - 0.5, i + 0.5, color=REMOVED, alpha=0.08, zorder=0)
        if key.endswith("vision_attention") and cert["policy"].get("max_vision_attention") is not None:
            ax.axhline(cert["policy"]["max_vision_attention"], color="#333", ls="--", lw=1, label="cross-modal limit")
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_xticks(idx)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xlabel("decoder layer (original numbering)")
    handles = [Patch(color=KEPT, label="kept"), Patch(color=REMOVED, label="removed"), Patch(color=PROTECTED, label="protected")]
    axes[0].legend(handles=handles, loc="upper right", fontsize=8, ncols=3)
    fig.suptitle(f"per-layer scores, {modality} tokens", fontsize=11)
    return fig


def plot_frontier(rows: list[Row], max_kl: float | None) -> Any | None:
    """KL and top-1 agreement against the number of removed layers, one line per method."""
    if not rows:
        return None
    fig, axes = _figure(2, height=2.8)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in methods:
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["k"])
        ks = [r["k"] for r in pts]
        kl = [r.get("kl", math.nan) for r in pts]
        kl_err = [max(r.get("kl_hi", r.get("kl", 0.0)) - r.get("kl", 0.0), 0.0) for r in pts]
        axes[0].errorbar(ks, kl, yerr=[[0.0] * len(pts), kl_err], marker="o", capsize=3, label=method)
        axes[1].plot(ks, [r.get("top1", math.nan) for r in pts], marker="o", label=method)
    if max_kl is not None:
        axes[0].axhline(max_kl, color="#333", ls="--", lw=1, label="requested bound")
    axes[0].set_ylim(bottom=0)
    axes[0].set_ylabel("KL(original‖slim), nats/token")
    axes[1].set_ylabel("top-1 agreement")
    axes[1].set_xlabel("layers removed (k)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=8)
    fig.suptitle("quality vs layers removed", fontsize=11)
    return fig


_SPREADS = (("lo_ms", "hi_ms"), ("p10_ms", "p90_ms"), ("q25_ms", "q75_ms"), ("min_ms", "max_ms"))


def plot_speed(speed: dict[str, Any] | None) -> Any | None:
    """Median latency per runner as horizontal bars, with the spread as error bars."""
    runners = (speed or {}).get("runners", [])
    if not runners:
        return None
    fig, (ax,) = _figure(1, height=max(1.6, 0.5 * len(runners) + 1))
    names = [str(r.get("runner", r.get("name", "?"))) for r in runners]
    med = [r["median_ms"] for r in runners]
    err: list[list[float]] = [[], []]
    for r, m in zip(runners, med):
        lo, hi = next(((r[a], r[b]) for a, b in _SPREADS if a in r and b in r), (m, m))
        err[0].append(max(m - lo, 0.0))
        err[1].append(max(hi - m, 0.0))
    bars = ax.barh(names, med, xerr=err, color=KEPT, capsize=4)
    ax.bar_label(bars, labels=[f"{m:.4g} ms" for m in med], label_type="center", color="white", fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("latency, ms (median, bars: spread)")
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle("speed", fontsize=11)
    return fig
