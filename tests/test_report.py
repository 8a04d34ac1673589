"""report.json / report.md / self-contained report.html from a real manifest (tiny LLaVA, one compress
run per module), and a headless Chromium screenshot of the HTML."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from skipit.compressor.certificate import CertifyPolicy
from skipit.pipeline import CompressOptions, DataOptions, compress
from skipit.report import KEPT, write_report

VALIDATION = {"checks": [
    {"name": "torch vs onnxruntime max |Δlogit|", "value": 2.1e-6, "bound": 1e-4, "passed": True},
    {"name": "<script>alert('x')</script> top-1", "value": 0.97, "bound": 0.98, "passed": False},
], "data": {"split": "test"}, "parity": {
    "logits": {"kl": {"mean": 0.1234, "lo": 0.11, "hi": 0.1387, "n": 40}, "top1": {"mean": 0.8123, "lo": 0.79, "hi": 0.83},
               "ppl_ratio": {"mean": 1.346, "lo": 1.3, "hi": 1.39}},
    "generation": {"token_match": {"mean": 0.6789, "lo": 0.6, "hi": 0.75}}}}
SPEED = {"device": "cpu", "shape": "1 × 256", "runners": [
    {"runner": "torch original", "median_ms": 432.0, "lo_ms": 420.0, "hi_ms": 451.0, "n": 20},
    {"runner": "torch slim", "median_ms": 398.0, "lo_ms": 390.0, "hi_ms": 410.0, "n": 20},
    {"runner": "onnxruntime slim", "median_ms": 181.0, "p10_ms": 176.0, "p90_ms": 190.0, "n": 20},
]}
FRONTIER = [{"method": method, "k": k, "kl": 0.15 * k * f, "top1": 1 - 0.08 * k * f, "ppl": 12.0 + k, "passes": 3 * k}
            for method, f in (("skipit", 1.0), ("ShortGPT", 1.5), ("SLEB", 0.95)) for k in (1, 2, 3)]
PLOTS = ("text_scores", "vision_scores", "frontier", "speed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def manifest(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The manifest of one real compress run on the tiny LLaVA (text and vision tokens)."""
    options = CompressOptions(data=DataOptions(limit=18, batch_size=4, max_length=48),
                              policy=CertifyPolicy(max_kl=None, max_layers=2))
    out = tmp_path_factory.mktemp("report") / "out"
    return compress(tiny_model_dir("LlavaForConditionalGeneration"), out, options).manifest.as_dict()


@pytest.fixture(scope="module")
def full(manifest: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_report(tmp_path_factory.mktemp("full"), manifest, VALIDATION, SPEED, FRONTIER)


def test_files_and_merged_json(full: dict[str, Path], manifest: dict[str, Any]) -> None:
    for key in ("json", "md", "html", *(f"plot:{p}" for p in PLOTS)):
        assert full[key].is_file() and full[key].stat().st_size > 0, key
    merged = json.loads(full["json"].read_text())
    assert merged["manifest"]["layers"]["removed"] == manifest["layers"]["removed"]
    assert merged["validation"] == VALIDATION and merged["speed"] == SPEED and merged["frontier"] == FRONTIER
    assert set(merged["plots"]) == set(PLOTS)
    md = full["md"].read_text()
    assert all(f"(plots/{p}.png)" in md for p in PLOTS)
    assert not list(full["html"].parent.glob(".*.tmp")), "temporary files left behind"


def test_html_is_self_contained(full: dict[str, Path]) -> None:
    html = full["html"].read_text()
    images = re.findall(r'<img id="plot-(\w+)"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert sorted(name for name, _ in images) == sorted(PLOTS)
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for _, data in images)
    assert "http://" not in html and "https://" not in html
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"|url\(([^)]*)\)', html)
    assert all((a or b).startswith("data:") for a, b in refs), "external resource referenced"
    assert "<link" not in html and "<script" not in html


def test_removed_layers_are_marked_in_tables(full: dict[str, Path], manifest: dict[str, Any]) -> None:
    removed = manifest["layers"]["removed"]
    html = full["html"].read_text()
    conditions = html.split('id="conditions-per-layer"')[1].split("</section>")[0]
    marked = [int(n) for n in re.findall(r'<tr class="hl"><td>(\d+)</td>', conditions)]
    assert marked == removed
    md = full["md"].read_text()
    assert [int(n) for n in re.findall(r"^\| \*\*(\d+)\*\* \|", md, flags=re.M)] == removed
    assert f"removed layers (original numbering) | {', '.join(map(str, removed))}" in md


def test_values_are_escaped(full: dict[str, Path]) -> None:
    html = full["html"].read_text()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; top-1" in html
    assert "1 of 2 checks passed." in html


def test_manifest_only_report(manifest: dict[str, Any], tmp_path: Path) -> None:
    """Without parity/speed/frontier: those sections are left out; the frontier is skipit's own path."""
    written = write_report(tmp_path, manifest)
    assert sorted(k for k in written if k.startswith("plot:")) == ["plot:frontier", "plot:text_scores", "plot:vision_scores"]
    html = written["html"].read_text()
    assert 'id="parity"' not in html and 'id="speed"' not in html
    frontier = json.loads(written["json"].read_text())["frontier"]
    assert frontier[-1]["method"] == "skipit certified (held-out)"
    assert frontier[-1]["layers"] == manifest["layers"]["removed"]
    assert frontier[-1]["kl_hi"] == manifest["certificate"]["holdout"]["kl"]["hi"]


def test_chromium_renders_report(full: dict[str, Path], tmp_path: Path) -> None:
    """Headless Chromium screenshot: right size, not blank, plots (blue bars) and highlighted rows drawn."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed in CI: apt-get install -y --no-install-recommends chromium")
        pytest.skip("chromium not installed (apt-get install -y --no-install-recommends chromium)")
    from PIL import Image

    shot = tmp_path / "report.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           "--force-device-scale-factor=1", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1200,2400", full["html"].resolve().as_uri()]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"no screenshot (exit {run.returncode}): {run.stderr[-2000:]}"
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2400)
    colors = image.getcolors(maxcolors=1 << 24)
    assert len(colors) > 200, "screenshot looks blank"
    counts = {rgb: n for n, rgb in colors}
    kept_blue = tuple(int(KEPT[i:i + 2], 16) for i in (1, 3, 5))
    assert counts.get(kept_blue, 0) > 5000, "plot bars not rendered"
    assert counts.get((0xFD, 0xE2, 0xE1), 0) > 1000, "removed-layer rows not highlighted"
    white = counts.get((255, 255, 255), 0)
    assert white < 0.9 * image.size[0] * image.size[1], "page is mostly white"


def test_size_and_test_split_parity_are_in_the_html(full: dict[str, Path], manifest: dict[str, Any]) -> None:
    """report.html shows parameter and file-size reduction and the measured test-split figures, not only checks."""
    size = manifest["size"]
    assert 0 < size["parameters"]["slim"] < size["parameters"]["original"]
    assert 0 < size["parameters"]["reduction"] < 1 and size["bytes"]["model"] > 0 and size["bytes"]["source"] > 0
    html = full["html"].read_text()
    assert "<h2>Size</h2>" in html or ">Size<" in html, "no Size section"
    assert str(size["parameters"]["slim"]) in html and str(size["parameters"]["original"]) in html
    assert f"{size['parameters']['reduction']:.1%}" in html
    assert "Measured on the test split" in html
    for label, value in (("perplexity ratio slim / original", "1.346"), ("greedy token match", "0.6789"),
                         ("KL(original‖slim), nats/token", "0.1234")):
        assert label in html and value in html, label


def test_manifest_round_trips_through_its_dict_and_reads_format_1(manifest: dict[str, Any]) -> None:
    """Manifest.from_dict(as_dict()) is lossless (through JSON, as on disk); the bound has one home (the
    certificate's policy); a format-1 manifest (which also stored it as ``thresholds``) still reads."""
    from skipit.compressor.manifest import Manifest
    from skipit.errors import InvalidOptionError

    as_json = json.loads(json.dumps(manifest, default=str))
    typed = Manifest.from_dict(as_json)
    assert json.dumps(typed.as_dict(), sort_keys=True, default=str) == json.dumps(as_json, sort_keys=True)
    assert as_json["format"] == Manifest.FORMAT and "thresholds" not in as_json
    assert typed.max_kl == as_json["certificate"]["policy"]["max_kl"] and typed.removed == as_json["layers"]["removed"]
    old = {**as_json, "format": "skipit-manifest/1", "thresholds": as_json["certificate"]["policy"], "later": {"x": 1}}
    read = Manifest.from_dict(old)
    assert read.removed == typed.removed and read.extra == {"later": {"x": 1}}
    assert "thresholds" not in read.as_dict() and read.as_dict()["later"] == {"x": 1}
    with pytest.raises(InvalidOptionError, match="manifest format"):
        Manifest.from_dict({**as_json, "format": "skipit-manifest/99"})
