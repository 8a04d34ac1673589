"""The record of how a slim model was made (``skipit_manifest.json``) and its README model card."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from skipit.compressor.certificate import Certificate
from skipit.compressor.gguf_meta import gguf_header_fields
from skipit.errors import InvalidOptionError

MANIFEST_NAME = "skipit_manifest.json"


def versions() -> dict[str, str]:
    """Versions of the pieces that shaped the output."""
    import torch
    import transformers

    from skipit import __version__

    return {"skipit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


@dataclass
class Manifest:
    """The record of one run, as ``skipit_manifest.json`` holds it: typed, versioned, with a lossless dict
    round trip (:meth:`as_dict` / :meth:`from_dict`). Every setting has one home: the bound and the other
    thresholds are the certificate's ``policy``; the data's description and splits are ``calibration``.

    Readers of older formats: ``skipit-manifest/1`` also stored the policy as ``thresholds`` (the same
    values as ``certificate.policy``); :meth:`from_dict` drops it. Keys this version does not know are kept
    in ``extra`` and written back unchanged.
    """

    FORMAT: ClassVar[str] = "skipit-manifest/2"
    READS: ClassVar[tuple[str, ...]] = ("skipit-manifest/1", "skipit-manifest/2")

    source: dict[str, Any]
    architecture: str
    layers: dict[str, Any]
    certificate: Certificate
    analyze_config: dict[str, Any]
    calibration: dict[str, Any]
    config_diff: dict[str, Any]
    reload_check: dict[str, Any]
    versions: dict[str, str] = field(default_factory=versions)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    #: written later in the run: the slim GGUF (GGUF input) and the size record
    gguf: dict[str, Any] | None = None
    size: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def removed(self) -> list[int]:
        """Removed layers, original numbering."""
        return list(self.layers.get("removed", self.certificate.layers))

    @property
    def max_kl(self) -> float | None:
        """The KL bound the run was asked for (nats/token), or None (a layer budget only)."""
        return self.certificate.policy.get("max_kl")

    @property
    def longest_context(self) -> int | None:
        """The longest context (tokens) the certificate's held-out data covered."""
        return self.certificate.holdout.get("longest_context")

    def as_dict(self) -> dict[str, Any]:
        """The JSON-able record (what :func:`write_manifest` writes)."""
        out: dict[str, Any] = {"format": self.FORMAT, "created": self.created, "source": self.source,
                               "architecture": self.architecture, "layers": self.layers,
                               "certificate": self.certificate.as_dict(), "analyze_config": self.analyze_config,
                               "calibration": self.calibration, "config_diff": self.config_diff,
                               "reload_check": self.reload_check, "versions": self.versions}
        out.update({k: v for k, v in (("gguf", self.gguf), ("size", self.size)) if v is not None})
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """The manifest :meth:`as_dict` wrote (this format or an older one :data:`READS` names)."""
        fmt = data.get("format")
        if fmt not in cls.READS:
            raise InvalidOptionError(f"manifest format {fmt!r} is not one this skipit reads ({', '.join(cls.READS)}); "
                                     "rerun skipit-compress with this version")
        names = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: v for k, v in data.items() if k in names}
        kw["certificate"] = Certificate.from_dict(data["certificate"])
        extra = {k: v for k, v in data.items() if k not in names and k not in ("format", "thresholds")}
        return cls(**kw, extra=extra)

    @classmethod
    def read(cls, out_dir: Path) -> Manifest:
        """Read ``OUT_DIR/skipit_manifest.json``."""
        return cls.from_dict(read_manifest(out_dir))


def build_manifest(
    *,
    source: dict[str, Any],
    architecture: str,
    certificate: Certificate,
    config_diff: dict[str, Any],
    calibration: dict[str, Any],
    analyze_config: dict[str, Any],
    reload_check: dict[str, Any],
) -> Manifest:
    """Assemble the manifest: removed layers in original numbering, all scores, the certificate, versions."""
    n = certificate.n_layers
    kept = [i for i in range(n) if i not in set(certificate.layers)]
    return Manifest(
        source=source, architecture=architecture,
        layers={"original": n, "slim": len(kept), "removed": certificate.layers, "kept": kept,
                "removal_order": certificate.order},
        certificate=certificate, analyze_config=analyze_config, calibration=calibration, config_diff=config_diff,
        reload_check=reload_check,
    )


def write_manifest(out_dir: Path, manifest: Manifest | dict[str, Any]) -> Path:
    """Write ``skipit_manifest.json`` into ``out_dir`` (a staging folder: the move into place is atomic)."""
    record = manifest.as_dict() if isinstance(manifest, Manifest) else manifest
    path = out_dir / MANIFEST_NAME
    path.write_text(json.dumps(record, indent=2, default=_jsonable))
    return path


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """The JSON record in ``out_dir`` (:meth:`Manifest.read` gives the typed one)."""
    return json.loads((out_dir / MANIFEST_NAME).read_text())


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def _facts_table(manifest: dict[str, Any]) -> str:
    """The markdown table of what was removed and the held-out parity (both cards show it)."""
    cert = manifest["certificate"]
    hold = cert["holdout"]
    layers = manifest["layers"]
    policy = cert["policy"]
    bound = f"{policy['max_kl']} nats/token" if policy.get("max_kl") is not None else "none (layer budget only)"
    src = manifest["source"]
    ver = manifest["versions"]
    return f"""| | |
|---|---|
| source | `{src['path']}` ({manifest['architecture']}) |
| decoder layers | {layers['original']} → {layers['slim']} |
| weights | {src.get('saved_dtype', 'float32')} (source: {src.get('dtype', 'unknown')}); the certificate below was measured in this dtype |
| removed (original numbering) | {', '.join(map(str, layers['removed']))} |
| requested KL bound | {bound} |
| held-out mean KL(original‖slim) | {hold['kl']['mean']:.4f} nats/token (≤ {hold['kl']['hi']:.4f} at {policy['confidence']:.0%} confidence) |
| held-out top-1 agreement | {hold['top1']['mean']:.3f} (≥ {hold['top1']['lo']:.3f}) |
{_bound_row(hold)}| held-out data | {hold['kl']['n']} samples, {hold['tokens']} text tokens, {manifest['calibration']['description']} |
| forward passes used | {cert['passes']['calibration']} calibration + {cert['passes']['holdout']} held-out |
| made with | skipit {ver['skipit']}, transformers {ver['transformers']}, torch {ver['torch']} |
"""


def _bound_row(hold: dict[str, Any]) -> str:
    bound = hold.get("bound")
    if not bound:
        return ""
    what = (f"worst domain ({bound['domain']}): KL ≤ {bound['kl_hi']:.4f}" if bound["kind"] == "worst-domain"
            else f"pooled: KL ≤ {bound['kl_hi']:.4f}")
    longest = f"; contexts up to {hold['longest_context']} tokens" if hold.get("longest_context") else ""
    return f"| certified bound | {what}{longest} |\n"


def spread_tables(hold: dict[str, Any]) -> str:
    """Markdown tables of the held-out figures per domain and per position bucket (the spread behind the bound)."""
    parts = []
    for title, rows in (("domain", hold.get("domains") or {}), ("token positions", hold.get("positions") or {})):
        if not rows:
            continue
        lines = [f"| {title} | samples | tokens | mean KL | KL ≤ (95 %) | top-1 |", "|---|---|---|---|---|---|"]
        for name, f in rows.items():
            lines.append(f"| {name} | {f['samples']} | {f['tokens']} | {f['kl']['mean']:.4f} | {f['kl']['hi']:.4f} | "
                         f"{f['top1']['mean']:.3f} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + ("\n" if parts else "")


def model_card(manifest: dict[str, Any]) -> str:
    """A README.md for the output directory, stating what was removed and the measured parity."""
    cert = manifest["certificate"]
    layers = manifest["layers"]
    src = manifest["source"]
    return f"""---
tags: [skipit, layer-pruning]
---
# {Path(src['path']).name} — {layers['removed'].__len__()} of {layers['original']} decoder layers removed by skipit

This is a plain Hugging Face checkpoint (`model/`): load it with `transformers`
(`AutoModelForCausalLM` / `AutoModelForImageTextToText`), no skipit and no custom code needed.

{_facts_table(manifest)}
**What the bound means.** {cert['statement']} It was measured on a held-out split that played
no part in choosing the layers. It is a statement about data like that split: other kinds of text
(code, other languages, long contexts) can degrade more. Check on your own data with
`skipit validate` before shipping.

{spread_tables(cert['holdout'])}
Full evidence (per-layer scores, every verified step, config changes): `skipit_manifest.json`.
"""


# --------------------------------------------------------------------------------------------------
# The card inside model/: what the Hub shows when model/ is uploaded
# --------------------------------------------------------------------------------------------------
_HUB_URL = re.compile(r"https?://(?:www\.)?huggingface\.co/(?!datasets/|spaces/)([\w.-]+/[\w.-]+)/?$")
_LICENSE_KEYS = ("license", "license_name", "license_link")


def front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a model card (``---`` … ``---`` at the top), or {} when it has none or
    it is not a mapping."""
    import yaml

    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def source_card_metadata(source: str | Path) -> dict[str, Any]:
    """License and Hub id of the model skipit was given, from what it carries.

    A model directory: its ``README.md`` front matter (``license``, ``license_name``, ``license_link``)
    and ``config.json`` (``license``, when a checkpoint states one there). A GGUF file: its
    ``general.license`` and, as ``base_model``, ``general.source.huggingface.repository`` (or a
    huggingface.co ``general.source.url``), the repository it was converted from.
    """
    source = Path(source)
    found: dict[str, Any] = {}
    if source.is_file() and source.suffix == ".gguf":
        fields = gguf_header_fields(source, ("general.license", "general.source.huggingface.repository",
                                       "general.source.url"))
        if fields.get("general.license"):
            found["license"] = fields["general.license"]
        repo = fields.get("general.source.huggingface.repository")
        url = _HUB_URL.match(fields.get("general.source.url") or "")
        if repo or url:
            found["base_model"] = repo or url.group(1)  # type: ignore[union-attr]
        return found
    readme, config = source / "README.md", source / "config.json"
    if config.is_file():
        try:
            license_ = json.loads(config.read_text()).get("license")
        except ValueError:
            license_ = None
        if isinstance(license_, str) and license_:
            found["license"] = license_
    if readme.is_file():
        meta = front_matter(readme.read_text(errors="replace"))
        found.update({k: meta[k] for k in _LICENSE_KEYS if meta.get(k)})
    return found


def hub_model_card(manifest: dict[str, Any], *, pipeline_tag: str, metadata: dict[str, Any] | None = None,
                   base_model: str | None = None) -> str:
    """A README.md for ``model/`` that gives a proper Hugging Face Hub page when ``model/`` is uploaded.

    YAML front matter (the Hub's model-card metadata): ``base_model`` (the ``base_model`` argument, else
    ``metadata['base_model']``; left out when unknown, since a local path is not a Hub id),
    ``library_name: transformers``, ``pipeline_tag``, the source's license fields and ``tags``. The body
    says what was removed, shows the held-out parity and how to load the checkpoint.

    Args:
        manifest: the run's manifest (:func:`build_manifest`).
        pipeline_tag: ``text-generation`` or ``image-text-to-text``.
        metadata: what :func:`source_card_metadata` found in the source (license, base_model).
        base_model: the source's Hub id, when the model was given as one (overrides ``metadata``).
    """
    import yaml

    metadata = metadata or {}
    layers = manifest["layers"]
    hub_id = base_model or metadata.get("base_model")
    front: dict[str, Any] = {}
    if hub_id:
        front["base_model"] = hub_id
    front["library_name"] = "transformers"
    front["pipeline_tag"] = pipeline_tag
    front.update({k: metadata[k] for k in _LICENSE_KEYS if metadata.get(k)})
    front["tags"] = ["skipit", "layer-pruning", "pruned"]
    name = hub_id or Path(manifest["source"]["path"]).name
    auto = "AutoModelForImageTextToText" if pipeline_tag == "image-text-to-text" else "AutoModelForCausalLM"
    loader = "AutoProcessor" if pipeline_tag == "image-text-to-text" else "AutoTokenizer"
    base_line = f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else f"`{name}`"
    cert = manifest["certificate"]
    healed = ("The layers next to the gaps were then healed (distilled toward the original); details in the "
              "run's skipit_manifest.json." if cert.get("healing") else
              "The kept layers' weights are the original's, unchanged.")
    return f"""---
{yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip()}
---
# {name} with {len(layers['removed'])} of {layers['original']} decoder layers removed

{base_line} with decoder layers {', '.join(map(str, layers['removed']))} removed by
[skipit](https://pypi.org/project/skipit/) ({layers['original']} → {layers['slim']} layers), chosen and
verified on held-out data. {healed} Same tokenizer and chat template.

```python
from transformers import {auto}, {loader}
model = {auto}.from_pretrained("REPO_OR_FOLDER")
{loader.lower().replace('auto', '')} = {loader}.from_pretrained("REPO_OR_FOLDER")
```

{_facts_table(manifest)}
**What the bound means.** {cert['statement']} It holds for data like the held-out
split; other kinds of text can degrade more. Check on your own data before relying on it.
"""


def weight_bytes(path: Path) -> int:
    """Bytes of a model's weights: a file itself, or the weight files of a checkpoint folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf", ".pt"))


def size_record(params_original: int, params_slim: int, source: Path, out: Path) -> dict[str, Any]:
    """Parameters and weight bytes, original vs slim (``model/``; ``model.gguf`` where one was written)."""
    record: dict[str, Any] = {
        "parameters": {"original": params_original, "slim": params_slim,
                       "reduction": 1 - params_slim / params_original if params_original else None},
        "bytes": {"source": weight_bytes(source), "model": weight_bytes(out / "model")},
    }
    if (out / "model.gguf").is_file():
        record["bytes"]["model.gguf"] = (out / "model.gguf").stat().st_size
    return record
