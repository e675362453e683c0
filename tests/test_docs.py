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


def _parsers(parser) -> dict:
    """A parser's subcommands by name (argparse keeps them in its one subparsers action)."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flags(parser) -> set[str]:
    """Every option string of ``parser`` and of the subcommands under it."""
    flags = {s for action in parser._actions for s in action.option_strings}
    for sub in _parsers(parser).values():
        flags |= _flags(sub)
    return flags


def _command_spans(text: str) -> list[str]:
    """The `code spans` and the lines of fenced blocks that run ``streamcast``."""
    fenced = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    lines = [line for block in fenced for line in block.splitlines()]
    spans = re.findall(r"`([^`\n]*(?:\n[^`\n]*){0,2})`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [s for s in lines + spans if re.search(r"(^|[\s/])streamcast\s", s)]


def test_every_flag_the_docs_give_a_command_is_one_it_has():
    from streamcast.cli import build_parser

    top = build_parser()
    commands = _parsers(top)
    top_flags = {s for action in top._actions for s in action.option_strings}
    checked = 0
    for doc in [
        ROOT / "README.md",
        ROOT / "deploy" / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
    ]:
        for span in _command_spans(doc.read_text()):
            words = re.split(r"[\s\\|\[\]]+", span.split("streamcast", 1)[1].replace("\n", " "))
            words = [w for w in words if w]
            while words and words[0].startswith("-"):
                assert words.pop(0).split("=")[0] in top_flags, f"{doc.name}: `{span}`"
            if not words or words[0] not in commands:
                continue
            parser = commands[words[0]]
            allowed = _flags(parser) | top_flags
            for flag in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", " ".join(words[1:])):
                assert flag in allowed, f"{doc.name}: `{span}`: {words[0]} has no {flag}"
                checked += 1
    assert checked >= 40, f"only {checked} flags found in the docs' commands"


def _test_names(path: Path) -> list[str]:
    """The names pytest's ``-k`` matches for each test of a file: the function's, its
    parameters', its class's and the file's."""
    import ast

    names = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        scopes = [node] if isinstance(node, ast.ClassDef) else []
        for item in ast.iter_child_nodes(node) if scopes or node is tree else []:
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name.startswith(
                "test"
            ):
                params = [  # parametrize's values and ids: -k matches the test's id too
                    c.value
                    for d in item.decorator_list
                    for c in ast.walk(d)
                    if isinstance(c, ast.Constant) and isinstance(c.value, str)
                ]
                scope = [c.name for c in scopes]
                names.append(" ".join([item.name, *params, *scope, path.name, "tests"]))
    return names


def test_every_pytest_command_in_the_docs_selects_a_test():
    from _pytest.mark.expression import Expression

    checked = 0
    for doc in [
        ROOT / "README.md",
        ROOT / "deploy" / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
    ]:
        for found in re.finditer(
            r"pytest ((?:tests/\S+\.py\s*)+)(?:-k (\"[^\"]+\"|'[^']+'|\S+))?", doc.read_text()
        ):
            files, expr = found.group(1).split(), (found.group(2) or "").strip("\"'`")
            names = [n for f in files for n in _test_names(ROOT / f.split("::")[0])]
            assert names, f"{doc.name}: `{found.group(0)}`: no tests in {files}"
            if expr:
                compiled = Expression.compile(expr)
                hits = [
                    n for n in names if compiled.evaluate(lambda k, n=n: k.lower() in n.lower())
                ]
                assert hits, f"{doc.name}: `{found.group(0)}` selects no test"
            checked += 1
    assert checked >= 60, f"only {checked} pytest commands found in the docs"
