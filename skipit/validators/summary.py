"""One screen of plain text for a :class:`~skipit.validators.gate.ValidationReport` (CI logs, terminals)."""

from __future__ import annotations

from typing import Any

from skipit.compressor.stats import Estimate


def _est(e: Estimate | None, fmt: str = ".4f") -> str:
    return "n/a" if e is None else f"{e.mean:{fmt}} [{e.lo:{fmt}}, {e.hi:{fmt}}]"


def _parity_lines(report: Any) -> list[str]:
    lg = report.parity.logits
    lines = [
        f"KL(original‖slim)   {_est(lg.kl)} nats/token (95% CI); p{lg.quantile * 100:g} {lg.kl_quantile.mean:.4f}; "
        f"floor {lg.kl_floor.mean:.1e}",
        f"top-1 agreement     {_est(lg.top1, '.3f')}",
        f"perplexity          {lg.ppl_original.mean:.3f} → {lg.ppl_slim.mean:.3f}  (×{_est(lg.ppl_ratio, '.3f')})",
    ]
    gen = report.parity.generation
    if gen is not None:
        lines.append(f"greedy match        tokens {_est(gen.token_match, '.3f')}, sequences {_est(gen.sequence_match, '.3f')} "
                     f"({gen.new_tokens} new tokens, {gen.prompts} prompts)")
        if gen.accuracy_original is not None:
            lines.append(f"task accuracy       {gen.accuracy_original.mean:.3f} → {gen.accuracy_slim.mean:.3f}  "
                         f"(Δ {_est(gen.accuracy_delta, '+.3f')}, {gen.answered} answered samples)")
    return lines


def _speed_lines(report: Any) -> list[str]:
    speed = report.speed
    base = speed.runners[speed.baseline]
    longest = max(speed.seq_lens)
    lines = []
    for r in speed.runners.values():
        t = r.prefill[longest]
        line = (f"{r.name:<19} prefill {longest}: {t.median:8.2f} ms [{t.q1:.2f}, {t.q3:.2f}]"
                f" ×{r.prefill_speedup[longest]:.2f}")
        if r.tokens_per_s is not None:
            line += f" · decode {r.tokens_per_s:7.1f} tok/s ×{r.decode_speedup or float('nan'):.2f}"
        lines.append(line)
    lines.append(f"(speedups vs {base.name}; medians of {speed.repeats} interleaved repeats, IQR in brackets)")
    return lines


def render_summary(report: Any) -> str:
    """The verdict first, then the data, the measured numbers and every check."""
    failed = report.failed_kinds
    verdict = "PASS" if not failed else "FAIL: " + ", ".join(failed)
    d = report.data
    lines = [
        f"skipit validate: {verdict} (exit code {report.exit_code})",
        f"original            {report.original}",
        f"slim                {report.slim}" + (f"  (removed layers {report.removed})" if report.removed else ""),
        f"data                {d['split']} split of {d['description']}: {d['samples']} samples, "
        f"{report.parity.logits.tokens} text tokens",
        *_parity_lines(report),
    ]
    if report.onnx is not None:
        o = report.onnx
        lines.append(f"ONNX vs torch slim  max |Δlogit| {o.logits.max_abs:.2e} (would need atol ≥ {o.logits.required_atol:.2e}), "
                     f"top-1 {o.logits.top1_agreement:.4f}, greedy match {o.generation.token_match:.3f} ({o.describe()})")
    if report.speed is not None:
        lines += _speed_lines(report)
    if getattr(report, "lm_eval", None) is not None:
        lines += [f"lm-eval {t.task:<12} {t.metric} {t.original.mean:.3f} → {t.slim.mean:.3f}  (Δ {_est(t.difference, '+.3f')}, "
                  f"paired, {t.items} items, {t.changed} scored differently)" for t in report.lm_eval.tasks]
    lines.append("checks:" if report.checks else "checks: none (give --max-kl, --min-top1, --max-acc-drop or --min-speedup)")
    for c in report.checks:
        note = f"  ({c.note})" if c.note else ""
        lines.append(f"  [{'pass' if c.passed else 'FAIL'}] {c.name} = {c.value:.4g} {c.op} {c.bound:g}{note}")
    return "\n".join(lines)
