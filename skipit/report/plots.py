"""The report's plots as PNG bytes (matplotlib imported lazily; Figure + Agg canvas, no pyplot global state)."""

from __future__ import annotations

import math
from typing import Any, Callable

from skipit.report.sections import Row

KEPT, REMOVED, PROTECTED = "#4c72b0", "#d62728", "#9e9e9e"
PLOT_CAPTIONS = {
    "text_scores": "Per-layer scores on text tokens (calibration split, before removal), bootstrap intervals.",
    "vision_scores": "Per-layer scores on vision tokens, and the share of text queries' attention on vision tokens.",
    "frontier": "Quality against the number of removed layers.",
    "speed": "Median latency per runner; error bars show the spread.",
}


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
    panels = [(k, t) for k, t in panels if any(_estimate(layer, k, modality) for layer in layers)]
    if not panels:
        return None
    from matplotlib.patches import Patch

    removed, protected = set(cert["layers"]), set(cert["policy"].get("protect_resolved", []))
    colors = [REMOVED if layer["index"] in removed else PROTECTED if layer["index"] in protected else KEPT
              for layer in layers]
    fig, axes = _figure(len(panels))
    for ax, (key, title) in zip(axes, panels):
        idx: list[int] = []
        mean: list[float] = []
        err: list[list[float]] = [[], []]
        for layer in layers:
            est = _estimate(layer, key, modality) or {"mean": math.nan, "lo": math.nan, "hi": math.nan}
            idx.append(layer["index"])
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
