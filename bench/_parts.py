"""Resumable benches made of ``monai-cxr-ssl`` commands: each part runs in fresh processes and is recorded in
``<output-dir>/parts.json`` when it finishes, so a rerun skips the finished parts (and a part interrupted half-way
resumes from its stage folders, as every stage does)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, log: Path) -> None:
    """Run ``monai-cxr-ssl args`` in a fresh process, its output appended to ``log``; a failure stops the bench."""
    with open(log, "a") as f:
        f.write(f"\n$ monai-cxr-ssl {' '.join(args)}\n")
        f.flush()
        done = subprocess.run([sys.executable, "-m", "monai_cxr_ssl.cli", *args], cwd=REPO, stdout=f,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"monai-cxr-ssl {args[0]} {args[1]} failed (exit {done.returncode}); see {log}")


def settings(**values) -> list[str]:
    """``--set key=value ...`` of ``values``."""
    return ["--set", *(f"{k}={v}" for k, v in values.items())]


def test_report(stage_dir: Path) -> dict:
    """The test split's mean and per-class AUROC of an evaluated stage, and the classes left out of the mean."""
    report = json.loads((stage_dir / "test_metrics.json").read_text())
    return {"mean_auroc": report["mean_auroc"], "auroc": report["auroc"], "left_out": report["classes_left_out"]}


class Parts:
    """The finished parts of a bench and their results, in ``path`` (``<output-dir>/parts.json``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done = json.loads(path.read_text()) if path.is_file() else {}

    def run(self, name: str, work: Callable[[], dict]) -> dict:
        """``work()``'s result, recorded with its minutes under ``name``; the recorded one when it ran before."""
        if name in self.done:
            print(f"{name}: done earlier, skipped", flush=True)
            return self.done[name]
        start = time.perf_counter()
        print(f"{name}: running", flush=True)
        result = work()
        result["minutes"] = round((time.perf_counter() - start) / 60, 1)
        self.done[name] = result
        self.path.write_text(json.dumps(self.done, indent=2))
        print(f"{name}: {result}", flush=True)
        return result
