"""The record of how a slim model was made (``skipit_manifest.json``) and its README model card."""

from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path
from typing import Any

MANIFEST_NAME = "skipit_manifest.json"


def versions() -> dict[str, str]:
    """Versions of the pieces that shaped the output."""
    import torch
    import transformers

    from skipit import __version__

    return {"skipit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def build_manifest(
    *,
    source: dict[str, Any],
    architecture: str,
    certificate: Any,
    config_diff: dict[str, Any],
    calibration: dict[str, Any],
    analyze_config: dict[str, Any],
    reload_check: dict[str, Any],
) -> dict[str, Any]:
    """Assemble the manifest: removed layers in original numbering, all scores, the certificate, versions."""
    n = certificate.n_layers
    kept = [i for i in range(n) if i not in set(certificate.layers)]
    return {
        "format": "skipit-manifest/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "architecture": architecture,
        "layers": {"original": n, "slim": len(kept), "removed": certificate.layers, "kept": kept,
                   "removal_order": certificate.order},
        "certificate": certificate.as_dict(),
        "thresholds": certificate.policy,
        "analyze_config": analyze_config,
        "calibration": calibration,
        "config_diff": config_diff,
        "reload_check": reload_check,
        "versions": versions(),
    }


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    path = out_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, default=_jsonable))
    return path


def read_manifest(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / MANIFEST_NAME).read_text())


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def model_card(manifest: dict[str, Any]) -> str:
    """A README.md for the output directory, stating what was removed and the measured parity."""
    cert = manifest["certificate"]
    hold = cert["holdout"]
    layers = manifest["layers"]
    policy = cert["policy"]
    bound = f"{policy['max_kl']} nats/token" if policy.get("max_kl") is not None else "none (layer budget only)"
    src = manifest["source"]
    ver = manifest["versions"]
    return f"""---
tags: [skipit, layer-pruning]
---
# {Path(src['path']).name} — {layers['removed'].__len__()} of {layers['original']} decoder layers removed by skipit

This is a plain Hugging Face checkpoint (`model/`): load it with `transformers`
(`AutoModelForCausalLM` / `AutoModelForImageTextToText`), no skipit and no custom code needed.

| | |
|---|---|
| source | `{src['path']}` ({manifest['architecture']}) |
| decoder layers | {layers['original']} → {layers['slim']} |
| removed (original numbering) | {', '.join(map(str, layers['removed']))} |
| requested KL bound | {bound} |
| held-out mean KL(original‖slim) | {hold['kl']['mean']:.4f} nats/token (≤ {hold['kl']['hi']:.4f} at {policy['confidence']:.0%} confidence) |
| held-out top-1 agreement | {hold['top1']['mean']:.3f} (≥ {hold['top1']['lo']:.3f}) |
| held-out data | {hold['kl']['n']} samples, {hold['tokens']} text tokens, {manifest['calibration']['description']} |
| forward passes used | {cert['passes']['calibration']} calibration + {cert['passes']['holdout']} held-out |
| made with | skipit {ver['skipit']}, transformers {ver['transformers']}, torch {ver['torch']} |

**What the bound means.** {cert['statement']} It was measured on a held-out split that played
no part in choosing the layers. It is a statement about data like that split: other kinds of text
(code, other languages, long contexts) can degrade more. Check on your own data with
`skipit validate` before shipping.

Full evidence (per-layer scores, every verified step, config changes): `skipit_manifest.json`.
"""
