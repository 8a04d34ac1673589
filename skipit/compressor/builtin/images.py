"""Procedurally drawn calibration images, each paired with a question and its answer.

Every image is drawn with Pillow from a seeded random generator, so the same ``(n, seed, size)``
always yields the same pictures. Each record carries a ``meta`` dict describing exactly what was
drawn (shapes, bars, cells, clock hands, ...), from which the answer was computed; tests use it to
check that answers match the pixels.

Only Pillow and numpy are needed. Text uses Pillow's built-in default font, scaled where the Pillow
build supports ``ImageFont.load_default(size=...)`` and the small bitmap font otherwise.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["KINDS", "COLORS", "image_records", "draw_record"]

#: Named fill colours. They are far apart from each other and from every background below.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}

_BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255),
    (235, 235, 235),
    (245, 240, 225),
    (225, 238, 248),
    (232, 245, 232),
)

_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
_PLURAL: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}
_CORNERS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")

_SIGN_WORDS: tuple[str, ...] = (
    "OPEN", "CLOSED", "EXIT", "STOP", "BAKERY", "HOTEL", "GARDEN", "LIBRARY", "MUSEUM", "PHARMACY",
    "STATION", "PARKING", "TAXI", "CAFE", "MARKET", "BEACH", "SCHOOL", "POST", "BANK", "PIZZA",
    "FLOWERS", "BOOKS", "TICKETS", "ENTRANCE", "HARBOUR", "THEATRE", "BICYCLES", "SALE", "WELCOME", "FARM",
)

_BAR_LABEL_SETS: tuple[tuple[str, ...], ...] = (
    ("Mon", "Tue", "Wed", "Thu", "Fri"),
    ("Apples", "Pears", "Plums", "Figs", "Limes"),
    ("A", "B", "C", "D", "E"),
    ("North", "South", "East", "West"),
    ("Cats", "Dogs", "Fish", "Birds", "Mice"),
    ("Jan", "Feb", "Mar", "Apr", "May"),
)

#: The kinds of picture drawn, in the order :func:`image_records` cycles through them.
KINDS: tuple[str, ...] = ("shapes_count", "shape_corner", "bar_chart", "sign", "clock", "table", "grid_count")

_INK = (20, 20, 20)


@functools.lru_cache(maxsize=64)
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at roughly ``px`` pixels, or the fixed bitmap font where sizing is unsupported."""
    try:
        return ImageFont.load_default(size=max(6, int(px)))
    except (TypeError, OSError, ImportError, AttributeError):
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def _fitting_font(draw: ImageDraw.ImageDraw, text: str, max_w: float, max_h: float, start_px: int) -> Any:
    """The largest default font, starting from ``start_px``, whose rendering of ``text`` fits the box."""
    px = int(start_px)
    font = _font(px)
    while px > 6:
        w, h = _text_size(draw, text, font)
        if w <= max_w and h <= max_h:
            break
        px = int(px * 0.85)
        font = _font(px)
    return font


def _draw_text_centered(
    draw: ImageDraw.ImageDraw, center: tuple[float, float], text: str, font: Any, fill: tuple[int, int, int]
) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = center[0] - (right - left) / 2 - left
    y = center[1] - (bottom - top) / 2 - top
    draw.text((x, y), text, font=font, fill=fill)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=_INK, width=2)
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=_INK, width=2)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill, outline=_INK)
    else:  # pragma: no cover - internal misuse
        raise ValueError(f"unknown shape {shape!r}")


def _shape_probe(shape: str, box: tuple[int, int, int, int]) -> tuple[int, int]:
    """A pixel certainly inside the drawn shape (the centroid for triangles)."""
    x0, y0, x1, y1 = box
    if shape == "triangle":
        return int(round((x0 + x1) / 2)), int(round(y0 + 2 * (y1 - y0) / 3))
    return int(round((x0 + x1) / 2)), int(round((y0 + y1) / 2))


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    return _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]


def _shapes_count(rng: np.random.Generator, size: int) -> tuple[Image.Image, str, str, dict[str, Any]]:
    bg = _background(rng)
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    cells = 4
    cell = size / cells
    n_obj = int(rng.integers(4, 10))
    slots = rng.choice(cells * cells, size=n_obj, replace=False)
    colors = list(COLORS)
    # Few colours and shapes per picture, so that counts above one are common.
    palette = [colors[i] for i in rng.choice(len(colors), size=3, replace=False)]
    shapes = [_SHAPES[i] for i in rng.choice(len(_SHAPES), size=2, replace=False)]
    objects: list[dict[str, Any]] = []
    for slot in sorted(int(s) for s in slots):
        r, c = divmod(slot, cells)
        frac = float(rng.uniform(0.5, 0.8))
        side = cell * frac
        jx = float(rng.uniform(0, cell - side))
        jy = float(rng.uniform(0, cell - side))
        x0, y0 = int(c * cell + jx), int(r * cell + jy)
        box = (x0, y0, int(x0 + side), int(y0 + side))
        shape = shapes[int(rng.integers(len(shapes)))]
        color = palette[int(rng.integers(len(palette)))]
        _draw_shape(draw, shape, box, COLORS[color])
        objects.append({"shape": shape, "color": color, "box": box, "probe": _shape_probe(shape, box)})
    target = objects[int(rng.integers(len(objects)))]
    color, shape = target["color"], target["shape"]
    count = sum(1 for o in objects if o["color"] == color and o["shape"] == shape)
    templates = (
        "How many {c} {s} are in the picture?",
        "Count the {c} {s} in this image. How many are there?",
        "How many {c} {s} can you see?",
    )
    question = templates[int(rng.integers(len(templates)))].format(c=color, s=_PLURAL[shape])
    meta = {"background": bg, "objects": objects, "target": {"color": color, "shape": shape}}
    return img, question, str(count), meta


def _shape_corner(rng: np.random.Generator, size: int) -> tuple[Image.Image, str, str, dict[str, Any]]:
    bg = _background(rng)
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    half = size / 2
    objects: list[dict[str, Any]] = []
    color_names = list(COLORS)
    color_idx = rng.choice(len(color_names), size=4, replace=False)
    for k, corner in enumerate(_CORNERS):
        r, c = divmod(k, 2)
        side = half * float(rng.uniform(0.45, 0.7))
        x0 = int(c * half + float(rng.uniform(0.08, 0.92 - side / half)) * half)
        y0 = int(r * half + float(rng.uniform(0.08, 0.92 - side / half)) * half)
        box = (x0, y0, int(x0 + side), int(y0 + side))
        shape = _SHAPES[int(rng.integers(len(_SHAPES)))]
        color = color_names[int(color_idx[k])]
        _draw_shape(draw, shape, box, COLORS[color])
        objects.append({"corner": corner, "shape": shape, "color": color, "box": box, "probe": _shape_probe(shape, box)})
    k = int(rng.integers(4))
    target = objects[k]
    if rng.random() < 0.5:
        question, answer, asked = f"What shape is in the {target['corner']} corner?", target["shape"], "shape"
    else:
        question, answer, asked = f"What colour is the shape in the {target['corner']} corner?", target["color"], "color"
    meta = {"background": bg, "objects": objects, "target_corner": target["corner"], "asked": asked}
    return img, question, answer, meta


def _bar_chart(rng: np.random.Generator, size: int) -> tuple[Image.Image, str, str, dict[str, Any]]:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    labels = list(_BAR_LABEL_SETS[int(rng.integers(len(_BAR_LABEL_SETS)))])
    k = int(rng.integers(3, len(labels) + 1))
    labels = labels[:k]
    values = [int(v) for v in rng.choice(np.arange(1, 11), size=k, replace=False)]
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    left, right = int(size * 0.14), int(size * 0.96)
    top, bottom = int(size * 0.1), int(size * 0.82)
    tick_font = _font(max(8, size // 20))
    for v in range(0, 11, 2):  # gridlines and value labels
        y = bottom - (bottom - top) * v / 10
        draw.line([(left, y), (right, y)], fill=(215, 215, 215), width=1)
        _draw_text_centered(draw, (left * 0.5, y), str(v), tick_font, _INK)
    slot = (right - left) / k
    bars: list[dict[str, Any]] = []
    for i, (label, value) in enumerate(zip(labels, values)):
        x0 = int(left + slot * i + slot * 0.18)
        x1 = int(left + slot * (i + 1) - slot * 0.18)
        y0 = int(round(bottom - (bottom - top) * value / 10))
        box = (x0, y0, x1, bottom)
        draw.rectangle(box, fill=COLORS[color])
        font = _fitting_font(draw, label, slot * 0.95, size * 0.12, max(8, size // 18))
        _draw_text_centered(draw, ((x0 + x1) / 2, (bottom + size) / 2), label, font, _INK)
        bars.append({"label": label, "value": value, "box": box})
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=_INK, width=2)
    roll = rng.random()
    if roll < 0.4:
        question, answer = "Which bar is the tallest?", labels[int(np.argmax(values))]
    elif roll < 0.7:
        question, answer = "Which bar is the shortest?", labels[int(np.argmin(values))]
    else:
        i = int(rng.integers(k))
        question, answer = f"What is the value of the {labels[i]} bar?", str(values[i])
    meta = {"bars": bars, "color": color}
    return img, question, answer, meta


def _sign(rng: np.random.Generator, size: int) -> tuple[Image.Image, str, str, dict[str, Any]]:
    sky = ((170, 205, 235), (200, 220, 240), (235, 225, 200))[int(rng.integers(3))]
    img = Image.new("RGB", (size, size), sky)
    draw = ImageDraw.Draw(img)
    ground_y = int(size * 0.8)
    draw.rectangle((0, ground_y, size, size), fill=(110, 150, 80))
    board_color, text_color = (
        ((30, 110, 60), (255, 255, 255)),
        ((30, 60, 140), (255, 255, 255)),
        ((250, 250, 245), (20, 20, 20)),
        ((245, 200, 40), (20, 20, 20)),
        ((190, 30, 30), (255, 255, 255)),
    )[int(rng.integers(5))]
    word = _SIGN_WORDS[int(rng.integers(len(_SIGN_WORDS)))]
    w_frac = float(rng.uniform(0.7, 0.86))
    w = size * w_frac
    cx = size * float(rng.uniform(w_frac / 2 + 0.03, 1 - w_frac / 2 - 0.03))
    h = size * float(rng.uniform(0.26, 0.34))
    y0 = size * float(rng.uniform(0.14, 0.26))
    board = (int(cx - w / 2), int(y0), int(cx + w / 2), int(y0 + h))
    post_w = max(3, size // 28)
    draw.rectangle((int(cx - post_w / 2), board[3], int(cx + post_w / 2), ground_y + size // 20), fill=(100, 75, 50))
    draw.rectangle(board, fill=board_color, outline=_INK, width=max(2, size // 80))
    font = _fitting_font(draw, word, w * 0.85, h * 0.7, int(h * 0.6))
    _draw_text_centered(draw, ((board[0] + board[2]) / 2, (board[1] + board[3]) / 2), word, font, text_color)
    templates = ("What word is written on the sign?", "What does the sign say?", "Read the text on the sign.")
    question = templates[int(rng.integers(len(templates)))]
    meta = {"word": word, "board": board, "board_color": board_color, "text_color": text_color}
    return img, question, word, meta


def _clock(rng: np.random.Generator, size: int) -> tuple[Image.Image, str, str, dict[str, Any]]:
    bg = _background(rng)
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    hour = int(rng.integers(1, 13))
    minute = int(rng.integers(0, 12)) * 5
    cx = cy = size / 2
    radius = size * 0.42
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(252, 252, 248), outline=_INK,
                 width=max(2, size // 60))
    num_font = _font(max(8, size // 14))
    for h in range(1, 13):
        a = math.radians(h * 30)
        x_out, y_out = cx + radius * 0.92 * math.sin(a), cy - radius * 0.92 * math.cos(a)
        x_in, y_in = cx + radius * 0.84 * math.sin(a), cy - radius * 0.84 * math.cos(a)
        draw.line([(x_in, y_in), (x_out, y_out)], fill=_INK, width=2)
        _draw_text_centered(draw, (cx + radius * 0.7 * math.sin(a), cy - radius * 0.7 * math.cos(a)), str(h), num_font, _INK)
    minute_angle = minute * 6.0
    hour_angle = (hour % 12) * 30.0 + minute * 0.5

    def tip(angle_deg: float, length: float) -> tuple[float, float]:
        a = math.radians(angle_deg)
        return cx + length * math.sin(a), cy - length * math.cos(a)

    minute_tip = tip(minute_angle, radius * 0.62)
    hour_tip = tip(hour_angle, radius * 0.4)
    draw.line([(cx, cy), hour_tip], fill=_INK, width=max(3, size // 32))
    draw.line([(cx, cy), minute_tip], fill=(60, 60, 60), width=max(2, size // 56))
    draw.ellipse((cx - size // 60 - 2, cy - size // 60 - 2, cx + size // 60 + 2, cy + size // 60 + 2), fill=(200, 30, 30))
    templates = ("What time does the clock show?", "What time is it on this clock?", "Read the time on the clock face.")
    question = templates[int(rng.integers(len(templates)))]
    meta = {
        "hour": hour,
        "minute": minute,
        "center": (cx, cy),
        "hour_tip": hour_tip,
        "minute_tip": minute_tip,
        "hour_angle": hour_angle,
        "minute_angle": minute_angle,
    }
    return img, question, f"{hour}:{minute:02d}", meta


def _table(rng: np.random.Generator, size: int) -> tuple[Image.Image, str, str, dict[str, Any]]:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    rows, cols = int(rng.integers(2, 4)), int(rng.integers(2, 4))
    values = rng.integers(1, 100, size=(rows, cols)).astype(int)
    col_names = ["A", "B", "C"][:cols]
    margin = size * 0.06
    n_r, n_c = rows + 1, cols + 1  # header row and header column
    cw = (size - 2 * margin) / n_c
    ch = (size - 2 * margin) / n_r
    font = _font(max(8, int(min(cw, ch) * 0.38)))
    header_fill = (215, 228, 245)
    for r in range(n_r):
        for c in range(n_c):
            box = (margin + c * cw, margin + r * ch, margin + (c + 1) * cw, margin + (r + 1) * ch)
            fill = header_fill if (r == 0 or c == 0) else (255, 255, 255)
            draw.rectangle(box, fill=fill, outline=_INK, width=2)
            if r == 0 and c == 0:
                continue
            text = col_names[c - 1] if r == 0 else (f"Row {r}" if c == 0 else str(int(values[r - 1, c - 1])))
            cell_font = _fitting_font(draw, text, cw * 0.85, ch * 0.7, getattr(font, "size", 10))
            _draw_text_centered(draw, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), text, cell_font, _INK)
    if rng.random() < 0.6:
        r, c = int(rng.integers(rows)), int(rng.integers(cols))
        question = f"What number is in row {r + 1}, column {col_names[c]} of the table?"
        answer = str(int(values[r, c]))
    else:
        r = int(rng.integers(rows))
        question = f"What is the sum of the numbers in row {r + 1}?"
        answer = str(int(values[r].sum()))
    meta = {"values": values.tolist(), "columns": col_names}
    return img, question, answer, meta


def _grid_count(rng: np.random.Generator, size: int) -> tuple[Image.Image, str, str, dict[str, Any]]:
    bg = (255, 255, 255)
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    n = int(rng.integers(3, 6))
    names = list(COLORS)
    used = [names[i] for i in rng.choice(len(names), size=2, replace=False)]
    margin = size * 0.08
    cell = (size - 2 * margin) / n
    cells: list[dict[str, Any]] = []
    for r in range(n):
        for c in range(n):
            roll = rng.random()
            color = used[0] if roll < 0.3 else (used[1] if roll < 0.55 else None)
            box = (margin + c * cell, margin + r * cell, margin + (c + 1) * cell, margin + (r + 1) * cell)
            draw.rectangle(box, fill=COLORS[color] if color else bg, outline=_INK, width=2)
            probe = (int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2))
            cells.append({"row": r, "col": c, "color": color, "probe": probe})
    target = used[int(rng.integers(2))]
    count = sum(1 for cell_ in cells if cell_["color"] == target)
    if rng.random() < 0.7:
        question = f"How many {target} squares are in the grid?"
    else:
        question = f"In this {n} by {n} grid, how many cells are coloured {target}?"
    meta = {"n": n, "cells": cells, "target": target, "background": bg}
    return img, question, str(count), meta


_DRAWERS = {
    "shapes_count": _shapes_count,
    "shape_corner": _shape_corner,
    "bar_chart": _bar_chart,
    "sign": _sign,
    "clock": _clock,
    "table": _table,
    "grid_count": _grid_count,
}


def draw_record(kind: str, seed: int = 0, index: int = 0, size: int = 224) -> dict[str, Any]:
    """Draw one picture of ``kind``; deterministic in ``(kind, seed, index, size)``.

    Returns ``{"image", "text", "answer", "kind", "meta"}``; ``meta`` describes what was drawn.
    """
    if kind not in _DRAWERS:
        raise ValueError(f"unknown image kind {kind!r}; expected one of {', '.join(KINDS)}")
    if size < 64:
        raise ValueError(f"image size must be at least 64 pixels, got {size}")
    if seed < 0 or index < 0:
        raise ValueError("seed and index must be non-negative integers")
    rng = np.random.default_rng([int(seed), int(index), KINDS.index(kind)])
    image, question, answer, meta = _DRAWERS[kind](rng, int(size))
    return {"image": image, "text": question, "answer": answer, "kind": kind, "meta": meta}


def image_records(n: int, seed: int = 0, size: int = 224) -> list[dict[str, Any]]:
    """``n`` drawn images with a question each, cycling through :data:`KINDS`.

    Each record is ``{"image": PIL.Image.Image (RGB, size x size), "text": question, "answer": str,
    "kind": str, "meta": dict}``. The same ``(n, seed, size)`` always gives the same records, and a
    shorter ``n`` gives a prefix of a longer one.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return [draw_record(KINDS[i % len(KINDS)], seed=seed, index=i, size=size) for i in range(n)]
