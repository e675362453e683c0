"""The figures in the docs are the ones the benchmark scripts printed.

Each script writes its report to docs/results/NAME.md (``--record``); docs/BENCHMARKS.md and
docs/RELIABILITY.md embed those files between ``<!-- result: NAME -->`` markers
(``python bench/results.py`` refreshes them), and the README quotes figures from them.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from results import DOCS, RESULTS, blocks  # noqa: E402


def test_every_result_block_in_the_docs_is_its_file_verbatim():
    included = set()
    for doc in DOCS:
        for name, text in blocks(doc.read_text()):
            path = RESULTS / f"{name}.md"
            assert path.is_file(), f"{doc.name} includes {name}, but {path} does not exist"
            assert text == path.read_text(), (
                f"{doc.name}'s block {name} differs from {path.name}: run python bench/results.py"
            )
            included.add(name)
    recorded = {p.stem for p in RESULTS.glob("*.md")}
    assert recorded, "no recorded results"
    assert recorded <= included, f"recorded but shown nowhere: {sorted(recorded - included)}"


def test_every_result_names_the_command_that_produced_it():
    for path in RESULTS.glob("*.md"):
        first = path.read_text().splitlines()[0]
        assert re.match(
            r"Command: `python bench/\w+\.py.*` on \S+ \(.+\), \d{4}-\d\d-\d\d$", first
        ), f"{path.name}: {first}"


def test_the_readme_quotes_only_figures_the_scripts_printed():
    readme = (ROOT / "README.md").read_text()
    speed = readme.split("## Speed", 1)[1].split("\n## ", 1)[0]
    printed = " ".join(p.read_text() for p in RESULTS.glob("*.md"))
    numbers = {n.replace(",", "") for n in re.findall(r"\d[\d,]*(?:\.\d+)?", printed)}
    figures = re.findall(r"(\d[\d,]*(?:\.\d+)?) ?(?:x\b|ms\b|%|ticks/s|GFLOP/s)", speed)
    assert len(figures) >= 10, f"the README's speed section quotes few figures: {figures}"
    missing = [f for f in figures if f.replace(",", "") not in numbers]
    assert not missing, f"README figures that no recorded result holds: {missing}"


def test_the_residual_table_is_what_streamcast_evaluate_wrote():
    """docs/BENCHMARKS.md's S&P table against the metrics.json files `make experiments` writes."""
    import json

    import pytest

    text = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    table = text.split("| mode (dev-2c) |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    plain, residual = (
        json.loads((ROOT / "docs" / "figures" / name / "metrics.json").read_text())["modes"]
        for name in ("sp500", "sp500-residual")
    )
    for mode, row in zip(("point", "full", "multiple"), rows, strict=True):
        cells = [float(c.strip().strip("*")) for c in row[1:]]
        expected = [
            plain[mode]["model"]["mse"],
            plain[mode]["skill"],
            residual[mode]["model"]["mse"],
            residual[mode]["skill"],
            plain[mode]["naive"]["mse"],
        ]
        assert cells == pytest.approx(expected, rel=0.02, abs=0.001), (mode, cells, expected)
