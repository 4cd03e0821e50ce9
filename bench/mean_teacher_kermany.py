"""Mean teacher with AALS vs without sharpening (a0 = 1) vs the supervised teacher on real chest X-rays (Kermany
pediatric pneumonia vs normal), on CPU, per labeled fraction λ, next to the teacher-student results of
``bench/reproduce_table1.py`` when its output folder is given.

Each λ runs one pipeline (``monai_cxr_ssl.pipeline.Pipeline``): the teacher, then two mean-teacher runs started
from it, one with a0 = 1 and one with AALS (t = 0.4, a0 = 4), every model evaluated on the official test split
with ten-crop TTA. All unlabeled images (capped by ``--max-unlabeled``) are distilled and sharpened: the general
semi-supervised case, the same images the teacher-student pipeline pseudo-labels.

Then the imbalance AALS targets: the labeled split at ``--prevalence-lambda`` is subsampled to ``--prevalence``
positives; the same three models are trained, and sensitivity and specificity on the test split are reported at
the threshold that maximises Youden's J on the validation split.

Reduced from the paper to fit 2 CPU cores, all overridable: 64x64 images with 56x56 crops, teacher 10 epochs,
mean teacher 5 epochs with EMA decay 0.99 (the paper's 0.999 averages over ~1,000 steps; these runs take ~250),
ramp-up 1 epoch, 800 unlabeled images, one seed.

    python bench/mean_teacher_kermany.py --output-dir runs/mean_teacher --table1-dir runs/table1

Writes ``bench/results/mean_teacher_kermany.json`` (both tables, the sharpening statistics, the minutes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _results import write_results  # a sibling module: bench/ is on sys.path when run as bench/<script>.py
from monai.utils import path_to_sqlite_uri

from monai_cxr_ssl.cli import parse_overrides
from monai_cxr_ssl.evaluation import operating_point
from monai_cxr_ssl.launch import run_bundle
from monai_cxr_ssl.methods import evaluation, teacher_steps
from monai_cxr_ssl.methods.mean_teacher import mean_teacher_step
from monai_cxr_ssl.pipeline import Pipeline
from monai_cxr_ssl.tracking import tracking_client

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = ["kermany", "cpu_small"]
MODELS = {"teacher": "teacher", "mean_teacher_a1": "mean teacher a0=1", "mean_teacher_aals": "mean teacher AALS"}


def steps() -> list:
    """The teacher, a mean teacher without sharpening and one with AALS (t = 0.4, a0 = 4), each evaluated."""
    return [
        *teacher_steps(),
        mean_teacher_step("mean_teacher_a1", aals_a0=1.0),
        evaluation("mean_teacher_a1", "mean_teacher", MODELS["mean_teacher_a1"]),
        mean_teacher_step("mean_teacher_aals", aals_t=0.4, aals_a0=4.0),
        evaluation("mean_teacher_aals", "mean_teacher", MODELS["mean_teacher_aals"]),
    ]


def sharpening_stats(results: dict, tracking_uri: str) -> str:
    """Last-epoch mean a, fraction raised, and the student's and EMA teacher's best validation AUROC per run."""
    client = tracking_client(tracking_uri)
    parts = []
    for stage in ("mean_teacher_a1", "mean_teacher_aals"):
        run_id = results["runs"][stage]
        metrics = client.get_run(run_id).data.metrics
        best = {k: max(m.value for m in client.get_metric_history(run_id, k))
                for k in ("val_auroc", "val_auroc_teacher")}
        parts.append(f"{stage}: mean a {metrics['aals_mean_a']:.2f}, raised {metrics['aals_raised_fraction']:.1%}, "
                     f"best val AUROC student {best['val_auroc']:.3f} / EMA teacher {best['val_auroc_teacher']:.3f}")
    return "; ".join(parts)


def teacher_student(table1_dir: Path | None) -> dict[float, float]:
    """The fine-tuned student's test AUROC per λ from a ``reproduce_table1.py`` output folder, if given."""
    if table1_dir is None or not (table1_dir / "table1.json").is_file():
        return {}
    results = json.loads((table1_dir / "table1.json").read_text())["results"]
    return {r["labeled_fraction"]: r["auroc"].get("student") for r in results}


def validation_predictions(output_dir: Path, overrides: dict, stage: str) -> Path:
    """Evaluate ``stage``'s model on the validation split (ten-crop TTA), once; returns its predictions file."""
    path = output_dir / stage / "validation_predictions.npz"
    if not path.is_file():
        run_bundle(["evaluate", *OVERLAYS], **overrides, stage=stage, eval_split="validation",
                   executed_config=str(output_dir / stage / "config_evaluate_validation.json"),
                   run_name=f"{stage}-{output_dir.name}-evaluate-validation")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "kermany_pneumonia"))
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "mean_teacher"))
    parser.add_argument("--table1-dir", default=None, help="reproduce_table1.py output folder (teacher-student)")
    parser.add_argument("--lambdas", type=float, nargs="*", default=[0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--crop-size", type=int, default=56)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--mean-teacher-epochs", type=int, default=5)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--max-unlabeled", type=int, default=800, help="cap on distilled unlabeled images (0: all)")
    parser.add_argument("--prevalence", type=float, default=0.1, help="labeled-split prevalence of the imbalance run")
    parser.add_argument("--prevalence-lambda", type=float, default=0.1, help="λ of the imbalance run (0: skip it)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more pipeline overrides")
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        raise SystemExit(f"{args.data}: Kermany data not found; pass --data <kermany_pneumonia folder>.")

    base = Path(args.output_dir).resolve()
    tracking_uri = path_to_sqlite_uri(str(base / "mlflow.db"))
    common = {
        "dataset_dir": args.data, "tracking_uri": tracking_uri, "experiment_name": "kermany_mean_teacher",
        "image_size": args.image_size, "crop_size": args.crop_size, "teacher:num_epochs": args.teacher_epochs,
        "mean_teacher_epochs": args.mean_teacher_epochs, "ema_decay": args.ema_decay, "rampup_epochs": 1,
        "max_unlabeled": args.max_unlabeled or None, "seed": args.seed, **parse_overrides(args.set),
    }
    print("settings:", json.dumps(common), flush=True)
    start = time.perf_counter()
    aurocs, stats = {}, []
    for fraction in args.lambdas:
        out = base / f"lambda{fraction}-seed{args.seed}"
        results = Pipeline(OVERLAYS, {**common, "labeled_fraction": fraction, "output_dir": str(out)},
                           steps=steps(), name="mean-teacher-bench").run()
        aurocs[fraction] = [results["auroc"][name] for name in MODELS.values()]
        stats.append(f"λ={fraction:g}: " + sharpening_stats(results, tracking_uri))

    imbalance, imbalance_rows = [], []
    if args.prevalence_lambda:
        out = base / f"lambda{args.prevalence_lambda}-prevalence{args.prevalence}-seed{args.seed}"
        overrides = {**common, "labeled_fraction": args.prevalence_lambda, "labeled_prevalence": args.prevalence,
                     "output_dir": str(out)}
        results = Pipeline(OVERLAYS, overrides, steps=steps(), name="mean-teacher-bench-imbalance").run()
        stats.append("imbalance run: " + sharpening_stats(results, tracking_uri))
        split = json.loads((out / "split.json").read_text())
        imbalance.append(f"labeled split: {split['counts']['labeled']} images, {split['positives']['labeled'][0]} "
                         f"positive; validation {split['counts']['validation']}, test {split['counts']['test']}")
        pipeline_overrides = {k: v for k, v in overrides.items() if ":" not in k}
        for stage, name in MODELS.items():
            val = np.load(validation_predictions(out, pipeline_overrides, stage))
            test = np.load(out / stage / "test_predictions.npz")
            point = operating_point(val["labels"], val["probs"], test["labels"], test["probs"])
            imbalance.append(
                f"| {name} | {results['auroc'][name]:.3f} | {point['threshold']:.3f} | {point['sensitivity']:.3f} | "
                f"{point['specificity']:.3f} |"
            )
            imbalance_rows.append({"model": name, "test_auroc": round(results["auroc"][name], 3),
                                   **{k: round(float(point[k]), 3) for k in ("threshold", "sensitivity",
                                                                               "specificity")}})

    ts = teacher_student(Path(args.table1_dir).resolve() if args.table1_dir else None)
    rows = [f"| {fraction:.0%} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in [*cells, ts.get(fraction)])
            + " |" for fraction, cells in aurocs.items()]
    minutes = (time.perf_counter() - start) / 60
    print(f"\nmonai-cxr-ssl mean teacher on Kermany pneumonia ({minutes:.1f} min), test AUROC (ten-crop TTA):")
    print("| labeled | teacher | mean teacher a0=1 | mean teacher AALS | teacher-student (Table I student) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    if imbalance:
        print(f"\nlabeled split at λ={args.prevalence_lambda:g} subsampled to {args.prevalence:.0%} positives; "
              f"{imbalance[0]}")
        print("| model | test AUROC | threshold (val Youden) | test sensitivity | test specificity |")
        print("|---|---|---|---|---|")
        print("\n".join(imbalance[1:]))
    print()
    print("\n".join(stats))
    table = [{"labeled": f"{fraction:.0%}",
              **{name: round(v, 3) for name, v in zip(MODELS.values(), cells, strict=True)},
              "teacher-student (Table I student)": ts.get(fraction)} for fraction, cells in aurocs.items()]
    write_results(__file__, {"rows": table, "imbalance": imbalance_rows, "imbalance_split": imbalance[:1],
                             "sharpening": stats, "minutes": round(minutes, 1)},
                  {**common, "lambdas": args.lambdas, "prevalence": args.prevalence,
                   "prevalence_lambda": args.prevalence_lambda})


if __name__ == "__main__":
    main()
