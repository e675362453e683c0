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

from .helpers import known_settings  # noqa: E402


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


def _settings_table() -> dict[str, str]:
    """The README's settings table: variable -> its default cell. A row may name two variables,
    ``STREAMCAST_A_B`` / ``_C``: the second is the first with its last word(s) replaced."""
    known = known_settings()
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Settings (`streamcast serve`)", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in table.splitlines():
        match = re.match(r"\| `(STREAMCAST_\w+)`(?: / `(_\w+)`)? \| ([^|]+) \|", line)
        if not match:
            continue
        first, suffix, default = match.groups()
        defaults = [d.strip() for d in default.split(" / ")] if suffix else [default.strip()]
        names = [first]
        if suffix:
            words = first.split("_")
            fits = {"_".join(words[:-k]) + suffix for k in range(1, len(words) - 1)} & known
            assert len(fits) == 1, f"README: {line[:60]}: which variable is {suffix}? {fits}"
            names.append(fits.pop())
        assert len(defaults) == len(names), f"README: {line[:60]}: a default for each variable"
        assert not set(names) & set(rows), f"README: {line[:60]}: a second row of {names}"
        rows.update(zip(names, defaults, strict=True))
    return rows


def test_the_readme_settings_table_names_every_setting_and_no_other():
    known = known_settings()
    rows = _settings_table()
    assert not set(rows) - known, f"in the README, not settings: {sorted(set(rows) - known)}"
    assert not known - set(rows), f"settings missing from the README: {sorted(known - set(rows))}"


def test_the_readme_settings_table_states_the_numeric_defaults_the_code_has():
    from streamcast.settings import ENV_PREFIX, Settings

    checked = 0
    for name, cell in _settings_table().items():
        number = re.fullmatch(r"`(-?\d+(?:\.\d+)?(?:e-?\d+)?)`", cell.split(" (")[0])
        if not number:
            continue
        default = Settings.model_fields[name.removeprefix(ENV_PREFIX).lower()].default
        assert float(number.group(1)) == float(default), f"{name}: README {cell}, code {default}"
        checked += 1
    assert checked >= 40, f"only {checked} numeric defaults read from the table"
