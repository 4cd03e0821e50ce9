"""S²MTS² against the mean teacher, SimCLR + mean teacher and the supervised teacher on real chest X-rays, CPU-reduced.

Two data sets, one labeled fraction each (the issue's): the NIH ChestX-ray14 sample (``chestxray14_multilabel``,
14 classes, official split lists) at λ = 20% and Kermany pediatric pneumonia (binary, official test split) at
λ = 5%. On each, three pipelines in folders of their own, every model evaluated on the test split with ten-crop TTA:

- ``method=mean_teacher``: the supervised **teacher** (random init), then the **mean teacher** (KL consistency,
  AALS's defaults) from it;
- ``pretrain=simclr method=mean_teacher``: SimCLR, its encoder starts the teacher, then the same mean teacher: the
  ablation without the joint term and the key encoder (**simclr + mean teacher**);
- ``method=s2mts2``: the S²MTS² pre-training, the teacher from its query encoder, the mean teacher with MSE
  consistency on every image and a linear ramp (**s2mts2**).

Every pipeline is one part, recorded in ``<output-dir>/parts.json`` with the schedule it ran with when it finishes:
a rerun skips finished parts (whatever its options) and a part interrupted half-way resumes from its stage folders.
The table's ``schedule`` column says what each data set's parts ran with.

Reduced to fit 2 CPU cores (all options): 64x64 images (56x56 crops), teacher 10 epochs, mean teacher 5 epochs
with EMA decay 0.99, pre-training 10 epochs with a queue of 4,096 keys, 800 unlabeled images, one seed. The
committed run: the NIH sample with those, then (the machine shared with the test suite) Kermany with a shorter
schedule (its command is in the result file):

    python bench/s2mts2.py --output-dir runs/s2mts2
    python bench/s2mts2.py --output-dir runs/s2mts2 --teacher-epochs 6 --mean-teacher-epochs 3 --pretrain-epochs 5 \
        --max-unlabeled 400

Writes ``bench/results/s2mts2.json``: test AUROC per class and the mean over the classes defined, per model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# sibling modules: bench/ is on sys.path when run as bench/<script>.py
from _parts import REPO, Parts, cli, settings, test_report
from _results import write_results

SHARED = REPO.parent / "shared" / "data"
# column -> (pipeline, evaluated stage folder)
MODELS = {
    "teacher": ("mean_teacher", "teacher"),
    "mean teacher": ("mean_teacher", "mean_teacher"),
    "s2mts2": ("s2mts2", "s2mts2"),
    "simclr + mean teacher": ("simclr_mean_teacher", "mean_teacher"),
    "s2mts2 teacher (before fine-tuning)": ("s2mts2", "teacher"),
    "simclr + teacher": ("simclr_mean_teacher", "teacher"),
}
PIPELINES = {"mean_teacher": {"method": "mean_teacher"},
             "simclr_mean_teacher": {"pretrain": "simclr", "method": "mean_teacher"},
             "s2mts2": {"method": "s2mts2"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nih", default=str(SHARED / "chestxray14_sample"))
    parser.add_argument("--kermany", default=str(SHARED / "kermany_pneumonia"))
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "s2mts2"))
    parser.add_argument("--nih-lambda", type=float, default=0.2)
    parser.add_argument("--kermany-lambda", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--crop-size", type=int, default=56)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--mean-teacher-epochs", type=int, default=5)
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--queue-size", type=int, default=4096)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--max-unlabeled", type=int, default=800)
    parser.add_argument("--datasets", nargs="+", choices=("nih", "kermany"), default=["nih", "kermany"])
    args = parser.parse_args()
    datasets = [("NIH sample", args.nih, "chestxray14_multilabel", args.nih_lambda),
                ("Kermany", args.kermany, "kermany", args.kermany_lambda)]
    datasets = [d for d, key in zip(datasets, ("nih", "kermany"), strict=True) if key in args.datasets]
    for name, folder, _, _ in datasets:
        if not Path(folder).is_dir():
            raise SystemExit(f"{folder}: the {name} data is not there; pass --nih / --kermany <folder>.")
    base = Path(args.output_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    log = base / "bench.log"
    tracking_uri = f"sqlite:///{base / 'mlflow.db'}"
    common = {"tracking_uri": tracking_uri, "seed": args.seed, "val_interval": 1, "image_size": args.image_size,
              "crop_size": args.crop_size, "num_epochs": args.teacher_epochs,
              "mean_teacher_epochs": args.mean_teacher_epochs, "ema_decay": args.ema_decay,
              "simclr_epochs": args.pretrain_epochs, "s2mts2_epochs": args.pretrain_epochs,
              "queue_size": args.queue_size, "max_unlabeled": args.max_unlabeled}
    # what a part ran with, kept with its result: a rerun with other options skips parts run with the earlier ones
    schedule = (f"teacher {args.teacher_epochs}, mean teacher {args.mean_teacher_epochs}, pre-training "
                f"{args.pretrain_epochs} epochs; {args.max_unlabeled} unlabeled; queue {args.queue_size}")
    parts = Parts(base / "parts.json")
    start = time.perf_counter()

    rows, means = [], []
    for data, folder, overlay, fraction in datasets:
        reports = {}
        for pipeline, choice in PIPELINES.items():
            out = base / overlay / pipeline

            def run(out=out, choice=choice, folder=folder, overlay=overlay, fraction=fraction,
                    pipeline=pipeline) -> dict:
                cli("pipeline", overlay, "cpu_small", *settings(
                    **common, **choice, dataset_dir=folder, output_dir=out, labeled_fraction=fraction,
                    experiment_name=f"s2mts2_bench_{overlay}"), log=log)
                stages = {stage for p, stage in MODELS.values() if p == pipeline}
                return {**{stage: test_report(out / stage) for stage in stages}, "schedule": schedule}

            reports[pipeline] = parts.run(f"{data} {fraction:.0%}/{pipeline}", run)
        table = {column: reports[p][stage] for column, (p, stage) in MODELS.items()}
        label = f"{data} ({fraction:.0%} labeled)"
        for cls in table["teacher"]["auroc"]:
            auroc = {c: table[c]["auroc"][cls] for c in MODELS}
            rows.append({"data": label, "class": cls,
                         **{c: None if v is None else round(v, 3) for c, v in auroc.items()}})
        rows.append({"data": label, "class": "**mean**", **{c: round(table[c]["mean_auroc"], 3) for c in MODELS}})
        left_out = sorted({cls for c in MODELS for cls in table[c]["left_out"]})
        # parts recorded before their schedule was kept ran with the defaults of that time
        ran_with = {reports[p].get("schedule", "teacher 10, mean teacher 5, pre-training 10 epochs; 800 unlabeled; "
                                                 "queue 4096") for p in PIPELINES}
        means.append({"data": label, **{c: round(table[c]["mean_auroc"], 3) for c in MODELS},
                      "classes left out": ", ".join(left_out) or "none", "schedule": "; ".join(sorted(ran_with))})

    minutes = (time.perf_counter() - start) / 60
    print(json.dumps(means, indent=1))
    write_results(__file__, {"rows": means, "per_class": rows,
                             "part_minutes": {k: v["minutes"] for k, v in parts.done.items()},
                             "minutes_this_run": round(minutes, 1)},
                  {**{k: str(v) for k, v in common.items()}, "nih_lambda": args.nih_lambda,
                   "kermany_lambda": args.kermany_lambda})


if __name__ == "__main__":
    main()
