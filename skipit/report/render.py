"""Rendering the sections: one table helper for Markdown and HTML; the HTML is one self-contained file (inline
style, plots as base64 PNG, every value escaped)."""

from __future__ import annotations

import base64
import html
import math
from typing import Any

from skipit.report.plots import PLOT_CAPTIONS
from skipit.report.sections import Columns, Section

PLOTS_DIR = "plots"


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
