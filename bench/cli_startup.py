"""How fast the ``monai-cxr-ssl`` command starts: whole-process wall time of ``--help`` and ``compare --help``, the
slowest imports of ``--help`` (``python -X importtime``), and which heavy packages ``compare`` imports when it runs
on a small SQLite MLflow store.

    python bench/cli_startup.py [--repeats 5]

Prints the figures and writes ``bench/results/cli_startup.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "cli_startup.json"
CLI = [sys.executable, "-m", "monai_cxr_ssl.cli"]
HEAVY = ("torch", "monai", "mlflow", "pandas", "matplotlib", "sklearn", "ignite")
# Runs the CLI, then prints which heavy top-level packages it imported.
REPORT_IMPORTS = (
    "import json, sys\nfrom monai_cxr_ssl.cli import main\nmain(sys.argv[1:])\n"
    f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))"
)


def wall_times(cmd: list[str], repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` runs of ``cmd`` (each a new process)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def slowest_imports(cmd_args: list[str], top: int = 8) -> list[dict]:
    """The top-level imports of ``cmd_args`` with the largest cumulative time, from ``-X importtime``."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "monai_cxr_ssl.cli", *cmd_args],
                          capture_output=True, text=True, check=True)
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:"):].split("|"))
        if cumulative.isdigit() and not name.startswith(" ") and "." not in name.strip():
            rows.append({"module": name.strip(), "cumulative_s": int(cumulative) / 1e6})
    return sorted(rows, key=lambda r: -r["cumulative_s"])[:top]


def compare_on_a_store(root: Path) -> dict:
    """Run ``compare`` on a small SQLite store (3 evaluation runs); its wall time and the heavy packages imported."""
    import mlflow
    import numpy as np

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("bench", artifact_location=(root / "artifacts").as_uri())
    labels = np.array([[0], [1], [0], [1]], dtype=np.float32)
    for stage, seed, value in (("teacher", 0, 0.7), ("teacher", 1, 0.8), ("finetune", 0, 0.9)):
        run = client.create_run(experiment, run_name=f"{stage}-seed{seed}-evaluate").info.run_id
        for key, param in {"stage": stage, "labeled_fraction": 0.05, "seed": seed, "eval_split": "test"}.items():
            client.log_param(run, key, param)
        client.log_metric(run, "test_mean_auroc", value)
        np.savez(root / "test_predictions.npz", labels=labels, probs=labels * value)
        client.log_artifact(run, str(root / "test_predictions.npz"))
        client.set_terminated(run)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", REPORT_IMPORTS, "compare", "bench", "--tracking-uri", uri,
                           "--output-dir", str(root / "out"), "--no-summary"],
                          capture_output=True, text=True, check=True, cwd=root)
    return {"wall_s": time.perf_counter() - start, "imports": json.loads(done.stdout.splitlines()[-1])}


def imports_of(cmd_args: list[str]) -> list[str]:
    """The heavy top-level packages that the CLI imports for ``cmd_args``."""
    done = subprocess.run([sys.executable, "-c", REPORT_IMPORTS, *cmd_args], capture_output=True, text=True)
    return json.loads(done.stdout.splitlines()[-1]) if done.stdout.strip() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (default: 5)")
    args = parser.parse_args()

    result: dict = {"python": platform.python_version(), "cpus": os.cpu_count(), "repeats": args.repeats,
                    "load_average_1min": os.getloadavg()[0]}  # other work on the machine slows every figure
    for name, cmd_args in (("help", ["--help"]), ("compare_help", ["compare", "--help"])):
        times = wall_times([*CLI, *cmd_args], args.repeats)
        result[name] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
        print(f"monai-cxr-ssl {' '.join(cmd_args)}: median {result[name]['median_s']:.2f} s "
              f"(min {min(times):.2f}, max {max(times):.2f}, {args.repeats} runs)")
    result["help_imports"] = imports_of(["bundle-path"])  # --help exits before the report: a command as light
    print(f"heavy packages imported by a light command (bundle-path): {result['help_imports'] or 'none'}")
    result["help_slowest_imports"] = slowest_imports(["--help"])
    print("slowest top-level imports of --help (cumulative): " + ", ".join(
        f"{r['module']} {r['cumulative_s']:.3f} s" for r in result["help_slowest_imports"]))
    with tempfile.TemporaryDirectory() as tmp:
        result["compare"] = compare_on_a_store(Path(tmp))
    print(f"compare on a 3-run SQLite store: {result['compare']['wall_s']:.2f} s, heavy packages imported: "
          f"{', '.join(result['compare']['imports'])} (torch imported: {'torch' in result['compare']['imports']}, "
          f"monai imported: {'monai' in result['compare']['imports']})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
