"""Where every bench script records what it measured: ``bench/results/<script>.json``.

One record per script (the latest run): its figures, its settings, the command line, the date and the machine (CPU
count, load at the end of the run, torch version and device), so that ``bench/report.py`` can render the tables of
``docs/benchmarks.md`` from it and nobody copies a figure by hand. ``figures`` holds plain values: scalars, or a
``rows`` list of dicts (one table row each, same keys in the same order).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """CPU count, 1-minute load average, Python, torch version and the device a bench would use."""
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
                            "python": platform.python_version(), "platform": platform.platform(terse=True)}
    try:
        import torch
    except ImportError:  # a bench that never needs torch (none today) still records the rest
        return info
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return info


def write_results(script: str, figures: dict[str, Any], settings: dict[str, Any], results_dir: Path = RESULTS) -> Path:
    """Write ``<results_dir>/<script's stem>.json`` and return its path; ``script`` is the caller's ``__file__``."""
    name = Path(script).stem
    record = {
        "script": f"bench/{name}.py",
        "command": shlex.join(["python", f"bench/{name}.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": settings,
        "figures": figures,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(f"results: {path}")
    return path
