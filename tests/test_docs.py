"""The docs: every relative link resolves, nothing points into the shared folder's docs, and docs/benchmarks.md is what
bench/report.py renders from the committed result files (so a figure copied by hand fails)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bundles" / "cxr_classifier" / "docs" /
        "README.md"]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def _bench_module(name: str):
    """A bench/ script as a module (bench/ is not a package; its scripts import their siblings by name)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "bench"))
    return module


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, code marks and punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    text = CODE.sub("", FENCE.sub("", path.read_text()))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_slug_follows_github():
    assert slug("Balanced filter quotas (`quota_prevalence`, pseudo-label stage)") == (
        "balanced-filter-quotas-quota_prevalence-pseudo-label-stage")
    assert slug("Export (`monai-cxr-ssl export <folder> -o model.ts`)") == (
        "export-monai-cxr-ssl-export-folder--o-modelts")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path):
    broken = []
    for target in links(doc):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading in {dest.relative_to(REPO)})")
    assert not broken, f"{doc.relative_to(REPO)}: broken links {broken}"


def test_link_check_finds_a_broken_link(tmp_path: Path):
    doc = tmp_path / "a.md"
    doc.write_text("# Title\n\n[ok](#title) [gone](b.md) [bad anchor](#nothing) `[code](x.md)`\n\n"
                   "```\n[x](y.md)\n```\n")
    assert links(doc) == ["#title", "b.md", "#nothing"]
    assert anchors(doc) == {"title"}


def test_nothing_points_into_shared_docs():
    needle = "../shared/" + "docs"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    texts = {".md", ".py", ".json", ".yaml", ".cfg", ".toml", ".txt", ""}
    hits = [name for name in listed if (REPO / name).is_file() and Path(name).suffix in texts
            and needle in (REPO / name).read_text(errors="ignore")]
    assert not hits, f"these files point to {needle}: {hits} (what users need belongs in docs/)"


def test_benchmarks_doc_is_what_report_renders():
    report = _bench_module("report")
    text = report.DOC.read_text()
    assert report.render(text) == text, "docs/benchmarks.md differs from the result files: run python bench/report.py"


def test_report_renders_a_result_file_and_catches_a_hand_edit(tmp_path: Path):
    results, report = _bench_module("_results"), _bench_module("report")
    figures = {"ratio": 0.97, "training": {"engine_over_plain": 1.01}, "rows": [{"case": "a|b", "ms": 1.5}]}
    path = results.write_results("bench/toy.py", figures,
                                 {"repeats": 3}, results_dir=tmp_path)
    record = json.loads(path.read_text())
    assert path.name == "toy.json" and record["settings"] == {"repeats": 3}
    assert record["machine"]["cpu_count"] >= 1 and record["command"].startswith("python bench/toy.py")
    doc = "intro\n<!-- report: toy -->\n0.99 by hand\n<!-- /report -->\n<!-- report: absent -->\n<!-- /report -->\n"
    rendered = report.render(doc, tmp_path)
    assert rendered != doc and "0.99" not in rendered
    assert "| ratio | 0.97 |" in rendered and "| a\\|b | 1.5 |" in rendered
    assert "| training engine_over_plain | 1.01 |" in rendered
    assert "No result file is committed yet: `python bench/absent.py`" in rendered
    assert report.render(rendered, tmp_path) == rendered


def test_readme_stays_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move details into docs/ (it should stay <= 200)"


def test_errors_doc_table_is_the_battery_result():
    """docs/errors.md quotes bench/results/bad_inputs.md's table as the battery last wrote it, not a hand copy."""
    def rows(path: Path) -> list[str]:
        return [line for line in path.read_text().splitlines() if line.startswith("|")]

    assert rows(REPO / "docs" / "errors.md") == rows(REPO / "bench" / "results" / "bad_inputs.md")
