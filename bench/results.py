"""Benchmark output that the docs include: one source for every published figure.

A script prints its report as it goes (``report(line)``); with ``--record`` it also writes it to
``docs/results/NAME.md``, headed by the command that produced it. docs/BENCHMARKS.md and
docs/RELIABILITY.md embed each file between ``<!-- result: NAME -->`` and ``<!-- /result -->``;
``python bench/results.py`` refreshes those blocks from the files, and tests/test_docs.py fails
when a block and its file differ, or when the README quotes a figure no file holds.
"""

from __future__ import annotations

import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DOCS = (ROOT / "docs" / "BENCHMARKS.md", ROOT / "docs" / "RELIABILITY.md")
BLOCK = re.compile(r"(<!-- result: ([a-z0-9-]+) -->\n)(.*?)(<!-- /result -->)", re.S)


class Report:
    """Lines printed now and, with ``record``, saved as ``docs/results/NAME.md``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def save(self, record: bool) -> None:
        if not record:
            return
        command = "python " + " ".join(["bench/" + Path(sys.argv[0]).name, *sys.argv[1:]])
        head = (
            f"Command: `{command}` on {platform.node()} ({platform.machine()}, {cpu_model()}, "
            f"{os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}\n\n"
        )
        RESULTS.mkdir(parents=True, exist_ok=True)
        body = "\n".join(self.lines).strip("\n")
        (RESULTS / f"{self.name}.md").write_text(head + "```\n" + body + "\n```\n")
        print(
            f"recorded in docs/results/{self.name}.md; `python bench/results.py` updates the docs"
        )


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def blocks(text: str) -> list[tuple[str, str]]:
    """(name, embedded text) of each result block in a document."""
    return [(m.group(2), m.group(3)) for m in BLOCK.finditer(text)]


def refresh(text: str) -> str:
    """The document with each result block replaced by its file's current text."""

    def fill(match: re.Match[str]) -> str:
        body = (RESULTS / f"{match.group(2)}.md").read_text()
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(fill, text)


if __name__ == "__main__":
    for doc in DOCS:
        doc.write_text(refresh(doc.read_text()))
        print(f"{doc.relative_to(ROOT)}: {len(blocks(doc.read_text()))} result blocks refreshed")
