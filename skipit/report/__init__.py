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

import datetime as _dt
import json
import logging
from pathlib import Path
from typing import Any

from skipit.atomic import write_atomic
from skipit.report.plots import KEPT, PLOT_CAPTIONS, PROTECTED, REMOVED, render_plots
from skipit.report.render import PLOTS_DIR, render_html, render_markdown, table_html, table_markdown
from skipit.report.sections import Section, build_sections, certificate_path

log = logging.getLogger(__name__)

REPORT_FORMAT = "skipit-report/1"


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
        written[f"plot:{name}"] = write_atomic(out_dir / PLOTS_DIR / f"{name}.png", data)
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
    written["json"] = write_atomic(out_dir / "report.json", json.dumps(merged, indent=2, default=str).encode())
    written["md"] = write_atomic(out_dir / "report.md", render_markdown(title, sections).encode())
    written["html"] = write_atomic(out_dir / "report.html", render_html(title, sections, pngs).encode())
    log.info("report written to %s (%d plots)", out_dir / "report.html", len(pngs))
    return written


def _title(manifest: dict[str, Any]) -> str:
    layers = manifest["layers"]
    name = Path(manifest.get("source", {}).get("path", "model")).name
    return f"skipit report — {name}: {layers['original']} → {layers['slim']} decoder layers"


__all__ = [
    "KEPT", "PLOTS_DIR", "PLOT_CAPTIONS", "PROTECTED", "REMOVED", "REPORT_FORMAT", "Section", "build_sections",
    "certificate_path", "render_html", "render_markdown", "render_plots", "table_html", "table_markdown",
    "write_report",
]
