"""The built-in calibration data: shipped prose, and drawn images whose answers match the pixels."""

from __future__ import annotations

import ast
import collections
import math
import re
from pathlib import Path

import pytest
from PIL import Image

from skipit.compressor import builtin
from skipit.compressor.builtin import COLORS, KINDS, image_records

REPO = Path(__file__).resolve().parents[1]
BUILTIN_DIR = REPO / "skipit" / "compressor" / "builtin"


# ----------------------------------------------------------------------------------------------- prose


def test_prose_is_large_unique_and_spread_over_domains() -> None:
    records = builtin.prose_records()
    texts = [r["text"] for r in records]
    assert len(set(texts)) == len(texts), "duplicated paragraphs"
    assert len(texts) >= 120
    domains = collections.Counter(r["domain"] for r in records)
    assert len(domains) >= 10
    assert min(domains.values()) >= 5, f"some domain is thin: {domains}"
    for r in records:
        assert set(r) == {"text", "domain"}
        words = len(r["text"].split())
        assert 60 <= words <= 180, f"{r['domain']} paragraph has {words} words: {r['text'][:60]!r}"
        assert "\n" not in r["text"] and r["text"] == r["text"].strip()


def test_prose_prefix_covers_domains_and_returns_fresh_lists() -> None:
    records = builtin.prose_records()
    assert len({r["domain"] for r in records[:40]}) >= 10, "domains should be interleaved in the file"
    records[0]["text"] = "mutated"
    assert builtin.prose_records()[0]["text"] != "mutated"


def test_prose_is_declared_as_package_data() -> None:
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["skipit.compressor.builtin"]
    assert any(Path("prose.jsonl").match(p) for p in patterns)


def test_builtin_modules_import_nothing_heavy() -> None:
    allowed = {"__future__", "functools", "json", "importlib", "typing", "math", "numpy", "PIL", "skipit"}
    for path in BUILTIN_DIR.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


# ---------------------------------------------------------------------------------------------- images


def _fingerprint(records: list[dict]) -> list[tuple]:
    return [(r["kind"], r["text"], r["answer"], r["image"].tobytes()) for r in records]


def test_images_are_deterministic_per_seed_and_differ_across_seeds() -> None:
    n = 2 * len(KINDS)
    a, b = image_records(n, seed=5), image_records(n, seed=5)
    assert _fingerprint(a) == _fingerprint(b)
    c = image_records(n, seed=6)
    differing = sum(x[3] != y[3] for x, y in zip(_fingerprint(a), _fingerprint(c)))
    assert differing >= n - 1
    assert _fingerprint(image_records(5, seed=5)) == _fingerprint(a[:5]), "shorter n should give a prefix"


@pytest.mark.parametrize("size", [96, 224, 336])
def test_images_are_rgb_of_requested_size_and_every_kind_appears(size: int) -> None:
    records = image_records(len(KINDS) + 3, seed=1, size=size)
    assert {r["kind"] for r in records} == set(KINDS)
    for r in records:
        assert isinstance(r["image"], Image.Image)
        assert r["image"].mode == "RGB" and r["image"].size == (size, size)
        assert isinstance(r["text"], str) and r["text"].endswith(("?", "."))
        assert isinstance(r["answer"], str) and r["answer"]
        assert isinstance(r["meta"], dict)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        image_records(-1)
    with pytest.raises(ValueError):
        image_records(1, size=16)
    with pytest.raises(ValueError):
        builtin.draw_record("no-such-kind")
    assert image_records(0) == []


def _many() -> list[dict]:
    return image_records(len(KINDS) * 12, seed=11) + image_records(len(KINDS) * 4, seed=2, size=128)


def _of(kind: str) -> list[dict]:
    return [r for r in _many() if r["kind"] == kind]


def test_shape_count_answers_match_the_drawn_shapes() -> None:
    for r in _of("shapes_count"):
        meta, img = r["meta"], r["image"]
        target = meta["target"]
        expected = sum(1 for o in meta["objects"] if o["color"] == target["color"] and o["shape"] == target["shape"])
        assert r["answer"] == str(expected) and expected >= 1
        assert target["color"] in r["text"] and target["shape"] in r["text"]
        for o in meta["objects"]:
            assert img.getpixel(tuple(o["probe"])) == COLORS[o["color"]]
        # everywhere outside the shapes' boxes is plain background: nothing else was drawn
        step = max(1, img.width // 28)
        for y in range(0, img.height, step):
            for x in range(0, img.width, step):
                if not any(o["box"][0] - 2 <= x <= o["box"][2] + 2 and o["box"][1] - 2 <= y <= o["box"][3] + 2
                           for o in meta["objects"]):
                    assert img.getpixel((x, y)) == tuple(meta["background"])


def test_corner_answers_match_the_shape_in_that_corner() -> None:
    for r in _of("shape_corner"):
        meta, img = r["meta"], r["image"]
        half = img.width / 2
        by_corner = {o["corner"]: o for o in meta["objects"]}
        assert set(by_corner) == {"top-left", "top-right", "bottom-left", "bottom-right"}
        for corner, o in by_corner.items():
            x, y = o["probe"]
            assert (x >= half) == corner.endswith("right") and (y >= half) == corner.startswith("bottom")
            assert img.getpixel((x, y)) == COLORS[o["color"]]
        target = by_corner[meta["target_corner"]]
        assert meta["target_corner"] in r["text"]
        assert r["answer"] == (target["shape"] if meta["asked"] == "shape" else target["color"])


def test_bar_chart_answers_match_the_bars() -> None:
    for r in _of("bar_chart"):
        meta, img = r["meta"], r["image"]
        bars = meta["bars"]
        values = [b["value"] for b in bars]
        assert len(set(values)) == len(values)
        heights = [b["box"][3] - b["box"][1] for b in bars]
        order = sorted(range(len(bars)), key=values.__getitem__)
        assert sorted(heights) == [heights[i] for i in order], "bar heights must follow the values"
        for b in bars:
            x0, y0, x1, y1 = b["box"]
            assert img.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == COLORS[meta["color"]]
            assert img.getpixel(((x0 + x1) // 2, y0 - 3)) != COLORS[meta["color"]]
        if "tallest" in r["text"]:
            assert r["answer"] == max(bars, key=lambda b: b["value"])["label"]
        elif "shortest" in r["text"]:
            assert r["answer"] == min(bars, key=lambda b: b["value"])["label"]
        else:
            label = re.search(r"value of the (\w+) bar", r["text"]).group(1)
            assert r["answer"] == str(next(b["value"] for b in bars if b["label"] == label))


def test_sign_answers_match_the_written_word() -> None:
    for r in _of("sign"):
        meta, img = r["meta"], r["image"]
        assert r["answer"] == meta["word"] and meta["word"].isupper()
        x0, y0, x1, y1 = meta["board"]
        assert 0 <= x0 < x1 <= img.width and 0 <= y0 < y1 <= img.height
        crop = img.crop((x0 + 4, y0 + 4, x1 - 4, y1 - 4))
        colors = {c for _, c in crop.getcolors(maxcolors=1 << 16)}
        assert tuple(meta["board_color"]) in colors and tuple(meta["text_color"]) in colors, "text was drawn"


def test_clock_answers_match_the_hands() -> None:
    for r in _of("clock"):
        meta, img = r["meta"], r["image"]
        h, m = meta["hour"], meta["minute"]
        assert r["answer"] == f"{h}:{m:02d}" and 1 <= h <= 12 and m % 5 == 0
        cx, cy = meta["center"]
        for key, expected in (("minute_tip", m * 6.0), ("hour_tip", (h % 12) * 30.0 + m * 0.5)):
            tx, ty = meta[key]
            angle = math.degrees(math.atan2(tx - cx, cy - ty)) % 360
            assert abs((angle - expected + 180) % 360 - 180) < 0.5
            mid = (int(round((cx + tx) / 2)), int(round((cy + ty) / 2)))
            assert max(img.getpixel(mid)) < 100, "hand is drawn in dark ink"


def test_table_answers_match_the_numbers() -> None:
    for r in _of("table"):
        values = r["meta"]["values"]
        cols = r["meta"]["columns"]
        cell = re.search(r"row (\d+), column (\w)", r["text"])
        if cell:
            row, col = int(cell.group(1)) - 1, cols.index(cell.group(2))
            assert r["answer"] == str(values[row][col])
        else:
            row = int(re.search(r"sum of the numbers in row (\d+)", r["text"]).group(1)) - 1
            assert r["answer"] == str(sum(values[row]))


def test_grid_count_answers_match_the_coloured_cells() -> None:
    for r in _of("grid_count"):
        meta, img = r["meta"], r["image"]
        assert len(meta["cells"]) == meta["n"] ** 2
        for c in meta["cells"]:
            expected = COLORS[c["color"]] if c["color"] else tuple(meta["background"])
            assert img.getpixel(tuple(c["probe"])) == expected
        count = sum(1 for c in meta["cells"] if c["color"] == meta["target"])
        assert r["answer"] == str(count) and meta["target"] in r["text"]


def test_calibration_uses_the_builtin_set() -> None:
    calibration = pytest.importorskip("skipit.compressor.calibration")
    samples = calibration.builtin_samples(with_images=True, seed=0)
    assert sum(s.image is None for s in samples) == len(builtin.prose_records())
    assert sum(s.image is not None for s in samples) == len(builtin.prose_records()) // 2
