"""Table I of the teacher-student paper on real chest X-rays (Kermany pediatric pneumonia vs normal), on CPU.

Runs the real pipeline (``monai_cxr_ssl.pipeline.run_sweep``: teacher → pseudo-label → balanced filter → student →
fine-tune, each a bundle workflow, ten-crop TTA for every evaluation) for each labeled fraction λ, prints the test
AUROC table next to the paper's, checks the paper's two claims and prints the pseudo-label quality per λ.

Validation is carved from the official train split (10%), the test set is the official test split (624 images).
Reduced from the paper to fit 2 CPU cores, all overridable: 64x64 images with 56x56 crops (paper 256/224), teacher
10 epochs (25), student 4 (10), fine-tune 6 (15), at most 1,500 unlabeled images pseudo-labelled per λ (all),
random initialisation (ImageNet), one seed.

    python bench/reproduce_table1.py --output-dir runs/table1

Writes ``bench/results/reproduce_table1.json`` (the table, the claims, the pseudo-label quality, the minutes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _results import write_results  # a sibling module: bench/ is on sys.path when run as bench/<script>.py
from monai.utils import path_to_sqlite_uri

from monai_cxr_ssl.cli import parse_overrides
from monai_cxr_ssl.pipeline import run_sweep
from monai_cxr_ssl.results import format_table1, table1
from monai_cxr_ssl.tracking import tracking_client

REPO = Path(__file__).resolve().parents[1]
PAPER = """| labeled | teacher | intermediate | student |
|---|---|---|---|
| 2% | 0.750 | 0.795 | 0.822 |
| 5% | 0.807 | 0.823 | 0.865 |
| 10% | 0.845 | 0.869 | 0.879 |
| 20% | 0.887 | 0.867 | 0.893 |
| 100% (supervised) | 0.906 | - | - |
"""


def claims(rows: list[dict]) -> list[str]:
    """The paper's claims checked on ``rows`` (``results.table1``): student > teacher for λ ≤ 10%, and the student
    at 2% at least as good as the teacher at 5%."""
    lines = []
    by_fraction = {row["labeled_fraction"]: row for row in rows}
    for fraction, row in by_fraction.items():
        if fraction <= 0.1 and row.get("student") and row.get("teacher"):
            better = row["student"][0] > row["teacher"][0]
            lines.append(f"student > teacher at {fraction:.0%}: {better} ({row['student'][0]:.3f} vs "
                         f"{row['teacher'][0]:.3f})")
    if 0.02 in by_fraction and 0.05 in by_fraction and by_fraction[0.02].get("student"):
        s2, t5 = by_fraction[0.02]["student"][0], by_fraction[0.05]["teacher"][0]
        lines.append(f"student at 2% >= teacher at 5%: {s2 >= t5} ({s2:.3f} vs {t5:.3f})")
    return lines


def pseudo_label_quality(results: list[dict], tracking_uri: str) -> list[str]:
    """Per run: the teacher's AUROC on the unlabeled images, and the kept set's size and label-flip rate."""
    client = tracking_client(tracking_uri)
    lines = []
    for result in results:
        run_id = result["runs"].get("pseudo_label")
        if run_id is None:
            continue
        m = {"pseudo_label_auroc": float("nan"), "pseudo_label_accuracy": float("nan"), "filter_kept": 0.0}
        m.update(client.get_run(run_id).data.metrics)
        flips = {k.removeprefix("filter_flip_rate_"): v for k, v in m.items() if k.startswith("filter_flip_rate_")}
        lines.append(
            f"λ={result['labeled_fraction']:g} seed={result['seed']}: pseudo-label AUROC "
            f"{m['pseudo_label_auroc']:.3f}, accuracy {m['pseudo_label_accuracy']:.3f}, kept {m['filter_kept']:.0f}, "
            "flip rate "
            + ", ".join(f"{k} {v:.3f}" for k, v in flips.items())
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "kermany_pneumonia"))
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "table1"))
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--crop-size", type=int, default=56)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--student-epochs", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--max-unlabeled", type=int, default=1500, help="cap on pseudo-labelled images (0: all)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more pipeline overrides")
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        raise SystemExit(f"{args.data}: Kermany data not found; pass --data <kermany_pneumonia folder>.")

    output_dir = Path(args.output_dir).resolve()
    tracking_uri = path_to_sqlite_uri(str(output_dir / "mlflow.db"))
    overrides = {
        "dataset_dir": args.data, "output_dir": str(output_dir), "tracking_uri": tracking_uri,
        "image_size": args.image_size, "crop_size": args.crop_size, "teacher:num_epochs": args.teacher_epochs,
        "student_epochs": args.student_epochs, "finetune_epochs": args.finetune_epochs,
        "max_unlabeled": args.max_unlabeled or None,
    }
    overrides.update(parse_overrides(args.set))
    print("settings:", json.dumps(overrides), flush=True)
    start = time.perf_counter()
    results = run_sweep(["kermany", "cpu_small"], overrides, args.lambdas, args.seeds)
    minutes = (time.perf_counter() - start) / 60
    rows = table1(results)
    print(f"\nmonai-cxr-ssl on Kermany pneumonia ({minutes:.1f} min):\n{format_table1(rows)}")
    print(f"paper (ChestX-ray14 Effusion, 256/224, 25+10+15 epochs, ImageNet init):\n{PAPER}")
    checked, quality = claims(rows), pseudo_label_quality(results, tracking_uri)
    for line in checked + quality:
        print(line)
    table = [{"labeled": f"{row['labeled_fraction']:.0%}", "seeds": len(row["seeds"]),
              **{col: None if value is None else round(value[0], 3)
                 for col, value in row.items() if col not in ("labeled_fraction", "seeds")}} for row in rows]
    write_results(__file__, {"rows": table, "minutes": round(minutes, 1), "claims": checked,
                             "pseudo_label_quality": quality}, {**overrides, "lambdas": args.lambdas,
                                                                "seeds": args.seeds})


if __name__ == "__main__":
    main()
