"""What a run on N torchrun processes gives against one process: the teacher stage and its ten-crop test evaluation.

Three runs of the teacher on the same split, each then evaluated on the test images (one process):

- ``one``: one process, batch B (the reference);
- ``ddp``: N gloo processes with batch B/N each (the same global batch, as docs/distributed.md advises);
- ``one_small``: one process, batch B/N: BatchNorm's statistics over B/N images, as each DDP rank computes them.

If ``ddp`` is near ``one_small`` rather than ``one``, the difference is the per-rank BatchNorm batch, not the DDP
step. Uses the real Kermany images when present (``--dataset-dir``), else synthetic ones. Each finished run is kept
in ``--output-dir`` and skipped when the script is run again (resumable). Prints the figures and writes
``bench/results/ddp_equivalence.json``; asserts nothing.

    python bench/ddp_equivalence.py --epochs 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _results import write_results

REPO = Path(__file__).resolve().parents[1]
KERMANY = REPO.parent / "shared" / "data" / "kermany_pneumonia"


def run_variant(args: argparse.Namespace, name: str, nproc: int, batch: int) -> dict:
    """Train and evaluate one variant (skipped when its report exists); its test AUROC and minutes."""
    out = Path(args.output_dir) / name
    report = out / "teacher" / "test_metrics.json"
    if not report.exists():
        out.mkdir(parents=True, exist_ok=True)
        split = Path(args.output_dir) / "split.json"
        if split.exists() and not (out / "split.json").exists():
            (out / "split.json").write_bytes(split.read_bytes())  # the same split for every variant
        settings = {"dataset_dir": args.dataset_dir, "output_dir": out, "labeled_fraction": args.labeled_fraction,
                    "num_epochs": args.epochs, "batch_size": batch, "num_workers": 0, "seed": args.seed}
        overlays = ["kermany" if args.dataset_dir != "synthetic" else "demo", "cpu_small"]
        start = time.monotonic()
        for stage, extra in (("train", ["--nproc-per-node", str(nproc)] if nproc > 1 else []),
                             ("evaluate", [])):
            command = [sys.executable, "-m", "monai_cxr_ssl.cli", "run", stage, *overlays, *extra, "--set",
                       *(f"{k}={v}" for k, v in settings.items()), *(["stage=teacher"] if stage == "evaluate" else [])]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{' '.join(map(str, command))} failed:\n{done.stderr[-3000:]}")
        if not split.exists():
            split.write_bytes((out / "split.json").read_bytes())
        (out / "minutes.txt").write_text(f"{(time.monotonic() - start) / 60:.2f}")
    metrics = json.loads(report.read_text())
    return {"variant": name, "processes": nproc, "batch_per_process": batch, "global_batch": batch * nproc,
            "test_auroc": round(metrics["mean_auroc"], 4), "minutes": float((out / "minutes.txt").read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", default=str(KERMANY) if KERMANY.is_dir() else "synthetic")
    parser.add_argument("--output-dir", default="runs/ddp_equivalence")
    parser.add_argument("--nproc-per-node", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="the global batch (per process: / N)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--labeled-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.dataset_dir == "synthetic":
        from monai_cxr_ssl.data import make_synthetic_dataset

        args.dataset_dir = make_synthetic_dataset(Path(args.output_dir) / "data", n_train=400, n_test=200)
    small = args.batch_size // args.nproc_per_node
    rows = [run_variant(args, "one", 1, args.batch_size),
            run_variant(args, "ddp", args.nproc_per_node, small),
            run_variant(args, "one_small", 1, small)]
    for row in rows:
        print(f"{row['variant']:>9}: {row['processes']} process(es) x batch {row['batch_per_process']}: "
              f"test AUROC {row['test_auroc']:.4f} ({row['minutes']:.1f} min)")
    write_results(__file__, {"rows": rows}, {k: v for k, v in vars(args).items() if k != "output_dir"})


if __name__ == "__main__":
    main()
