"""Render the figures of ``docs/benchmarks.md`` from the result files the bench scripts write.

Between ``<!-- report: <script> -->`` and ``<!-- /report -->`` the doc holds what this script renders from
``bench/results/<script>.json`` (``bench/_results.py`` writes it): the command, date and machine, then the figures
(scalars, and the scalars of dicts such as ``{"training": {"engine_over_plain": 0.97}}``, in one table; each
``rows``-like list of dicts in a table of its own; lists of lines as a list). A script
without a result file gets the line that says so and the command that makes one. Nothing else in the doc is
touched; ``tests/test_docs.py`` checks that the committed doc is what this renders, so a hand edit fails.

    python bench/report.py            # rewrite docs/benchmarks.md
    python bench/report.py --check    # exit 1 when docs/benchmarks.md is not what the result files give
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "benchmarks.md"
BLOCK = re.compile(r"(<!-- report: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /report -->)", re.S)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("|", "\\|")


def _table(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in rows]
    return lines


def render_record(record: dict) -> str:
    """The Markdown of one result file: where it was measured, then its figures."""
    m = record["machine"]
    where = f"{m['cpu_count']} CPUs (1-min load {m['load_average_1min']} at the end)"
    if "torch" in m:
        where += f", torch {m['torch']}, device {m['device']}"
    lines = [f"`{record['command']}`, {record['date']}, {where}:", ""]
    figures = record["figures"]
    scalars = [{"figure": f"{k} {sub}" if sub else k, "value": v}
               for k, group in figures.items() if not isinstance(group, list)
               for sub, v in (group.items() if isinstance(group, dict) else [("", group)])]
    if scalars:
        lines += [*_table(scalars), ""]
    for key, value in figures.items():
        if not isinstance(value, list) or not value:
            continue
        if key != "rows":
            lines += [f"{key}:", ""]
        if all(isinstance(v, dict) for v in value):
            lines += _table(value)
        else:
            lines += [f"- {_cell(v)}" for v in value]
        lines.append("")
    return "\n".join(lines)


def render_block(name: str, results_dir: Path) -> str:
    path = results_dir / f"{name}.json"
    if not path.is_file():
        return (f"No result file is committed yet: `python bench/{name}.py` writes `bench/results/{name}.json`, then "
                "`python bench/report.py` puts its figures here.\n")
    return render_record(json.loads(path.read_text()))


def render(text: str, results_dir: Path = RESULTS) -> str:
    """``text`` with every report block re-rendered from ``results_dir``."""
    return BLOCK.sub(lambda m: m.group(1) + render_block(m.group("name"), results_dir) + m.group(4), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when the doc is out of date")
    args = parser.parse_args()
    text = DOC.read_text()
    rendered = render(text)
    if args.check:
        if rendered != text:
            sys.exit(f"{DOC} is not what the result files give: run python bench/report.py")
        return
    DOC.write_text(rendered)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
