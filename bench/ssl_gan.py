"""The semi-supervised GAN on real chest X-rays (seed 002's tables), CPU-reduced: accuracy and AUROC per model.

**Few labels** (the paper's Table: 10 and 100 labeled images per class): Kermany pediatric pneumonia (NORMAL vs
PNEUMONIA as two exclusive classes, overlay ``multiclass``), official test split, ``labeled_per_class`` 10 and
100, three seeds each. One ``method=ssl_gan`` pipeline per (count, seed) trains and tests the three models the
table compares: the DenseNet121 **teacher**, the DCGAN **supervised discriminator** (the same network as the GAN's,
labeled images only) and the **ssl-gan** (its discriminator EMA).

**Domain adaptation** (the paper's second claim): labeled Kermany images (pediatric, ``labeled_per_class`` 100) and
the NIH ChestX-ray14 sample (adult) as ``eval_source``: its Pneumonia and No Finding images only (a CSV the bench
writes, classes NORMAL / PNEUMONIA, patients kept). Its official test list holds Pneumonia images only (no No
Finding image: AUROC undefined), so the bench leaves the lists out and the split carves validation (10%) and test
(20%) from these images, patient-grouped and stratified; the rest are the unlabeled images. The supervised models
never see an adult image (**without** the unlabeled adult images); the ssl-gan learns from them (**with**). The
paper's middle row, a GAN that learnt from the first site's unlabeled images only, is the few-labels run's ssl-gan
with the same labeled images (``--da-per-class`` among ``--per-class``), tested on the same adult test images.

A data check beside them: how well an image's brightness alone ranks PNEUMONIA at each site (``brightness``).

Each pipeline is one part, recorded in ``<output-dir>/parts.json`` with the schedule it ran with when it finishes:
a rerun skips finished parts and a part interrupted half-way resumes from its stage folders.

Reduced to fit 2 CPU cores (all options): 64x64 crops of 72x72 images (the paper's semi-supervised runs were
32x32), teacher and supervised discriminator 16 epochs, GAN 10 epochs of 800 unlabeled images, batch 16, the
model selected on validation every 2 epochs.

    python bench/ssl_gan.py --output-dir runs/ssl_gan

Writes ``bench/results/ssl_gan.json``: per setting and model the test accuracy and AUROC (mean ± sample std over
seeds, and each seed's), with the paper's accuracies beside them.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np

# sibling modules: bench/ is on sys.path when run as bench/<script>.py
from _parts import REPO, Parts, cli, settings
from _results import write_results

SHARED = REPO.parent / "shared" / "data"
MODELS = {"teacher": "teacher", "supervised discriminator": "supervised_discriminator", "ssl-gan": "ssl_gan"}
KERMANY_ONLY = "ssl-gan, Kermany's unlabeled images"  # the few-labels run's GAN, tested at the adult site
# Madani et al. 2018 (seed 002), accuracy in %: Table 1 (supervised CNN, semi-supervised GAN; 10 and 100 labeled
# images per class) and Table 2 (tested on dataset 2: a CNN and a semi-supervised GAN trained on dataset 1, and the
# semi-supervised GAN with dataset 2's images unlabeled).
PAPER = {"10 per class": {"teacher": 51.27, "supervised discriminator": 51.27, "ssl-gan": 73.08},
         "100 per class": {"teacher": 57.81, "supervised discriminator": 57.81, "ssl-gan": 79.58},
         "domain adaptation": {"teacher": 57.8, "supervised discriminator": 57.8, KERMANY_ONLY: 76.4,
                               "ssl-gan": 93.7}}


def nih_pneumonia_csv(sample: Path, out: Path) -> tuple[dict, list[tuple[str, int]]]:
    """A CSV of the sample's Pneumonia and No Finding images (classes NORMAL, PNEUMONIA; patient; no split column):
    the eval_source of the domain adaptation run. Returns its counts per official list and class, and its images
    with their PNEUMONIA label."""
    test = set((sample / "test_list.txt").read_text().split())
    rows, counts = [], {}
    with open(sample / "Data_Entry_2017.csv", newline="") as f:
        for row in csv.DictReader(f):
            findings = row["Finding Labels"].split("|")
            if "Pneumonia" not in findings and findings != ["No Finding"]:
                continue
            split = "test" if row["Image Index"] in test else "train"
            pneumonia = int("Pneumonia" in findings)
            rows.append({"image": str(sample / "images" / row["Image Index"]), "NORMAL": 1 - pneumonia,
                         "PNEUMONIA": pneumonia, "patient": row["Patient ID"]})
            key = f"{'test_list' if split == 'test' else 'train_val_list'} {'PNEUMONIA' if pneumonia else 'NORMAL'}"
            counts[key] = counts.get(key, 0) + 1
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return dict(sorted(counts.items())), [(r["image"], r["PNEUMONIA"]) for r in rows]


def brightness_auroc(name: str, images: list[tuple[str, int]]) -> dict:
    """How well an image's brightness alone ranks PNEUMONIA over ``images`` (path, PNEUMONIA label): the AUROC of
    the mean grey level, whole image and central half, at 64 px. A data check that tells whether a site's pneumonia
    images are brighter or darker than its normal ones, a cue a small model trained at one site may carry to the
    other."""
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    whole, centre = [], []
    for path, _ in images:
        pixels = np.asarray(Image.open(path).convert("L").resize((64, 64)), dtype=float) / 255
        whole.append(pixels.mean())
        centre.append(pixels[16:48, 16:48].mean())
    pneumonia = [label for _, label in images]
    return {"images": name, "n": len(images), "PNEUMONIA": sum(pneumonia),
            "AUROC of the mean grey level": round(float(roc_auc_score(pneumonia, whole)), 3),
            "AUROC of the central half's": round(float(roc_auc_score(pneumonia, centre)), 3)}


def stage_report(stage_dir: Path) -> dict:
    """An evaluated stage's test accuracy and AUROC (PNEUMONIA's: with two softmax classes both are the same)."""
    report = json.loads((stage_dir / "test_metrics.json").read_text())
    return {"accuracy": report["accuracy"], "auroc": report["mean_auroc"]}


def summary(runs: list[dict]) -> dict:
    """Test accuracy and AUROC over ``runs`` (one per seed): mean ± sample std (± 0 for one run), and each run's."""
    out = {}
    for key, name in (("accuracy", "accuracy"), ("auroc", "AUROC")):
        values = np.array([r[key] for r in runs], dtype=float)
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out[name] = f"{values.mean():.3f} ± {std:.3f}"
        out[f"{name} per seed"] = ", ".join(f"{v:.3f}" for v in values)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kermany", default=str(SHARED / "kermany_pneumonia"))
    parser.add_argument("--nih", default=str(SHARED / "chestxray14_sample"))
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "ssl_gan"))
    parser.add_argument("--per-class", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--da-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--da-per-class", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=72)
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=16, help="the teacher's and the supervised discriminator's")
    parser.add_argument("--gan-epochs", type=int, default=10)
    parser.add_argument("--val-interval", type=int, default=2, help="epochs between validations (model selection)")
    parser.add_argument("--max-unlabeled", type=int, default=800)
    args = parser.parse_args()
    for name, folder in (("Kermany", args.kermany), ("NIH sample", args.nih)):
        if not Path(folder).is_dir():
            raise SystemExit(f"{folder}: the {name} data is not there; pass --kermany / --nih <folder>.")
    base = Path(args.output_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    log = base / "bench.log"
    common = {"tracking_uri": f"sqlite:///{base / 'mlflow.db'}", "experiment_name": "ssl_gan_bench",
              "method": "ssl_gan", "dataset_dir": args.kermany, "image_size": args.image_size,
              "crop_size": args.crop_size, "num_epochs": args.epochs, "ssl_gan_epochs": args.gan_epochs,
              "max_unlabeled": args.max_unlabeled, "val_interval": args.val_interval}
    # what a part ran with, kept with its result: a rerun with other options skips parts run with the earlier ones
    schedule = (f"{args.crop_size} px; teacher and supervised discriminator {args.epochs} epochs, GAN "
                f"{args.gan_epochs} epochs of {args.max_unlabeled} unlabeled; validation every {args.val_interval}")
    nih_csv = base / "nih_pneumonia_vs_no_finding.csv"
    nih_counts, adult = nih_pneumonia_csv(Path(args.nih), nih_csv)
    eval_source = json.dumps({"_target_": "monai_cxr_ssl.data.CsvSource", "csv_path": str(nih_csv),
                              "label_columns": ["NORMAL", "PNEUMONIA"], "patient_column": "patient"})
    kermany_test = [(str(path), int(c == "PNEUMONIA")) for c in ("NORMAL", "PNEUMONIA")
                    for path in sorted((Path(args.kermany) / "test" / c).glob("*"))]
    brightness = [brightness_auroc("Kermany test split (children)", kermany_test),
                  brightness_auroc("NIH sample, Pneumonia vs No Finding (adults)", adult)]
    parts = Parts(base / "parts.json")
    start = time.perf_counter()

    def pipeline(name: str, **values) -> dict:
        out = base / name

        def run() -> dict:
            cli("pipeline", "kermany", "multiclass", "cpu_small", *settings(**common, **values, output_dir=out),
                log=log)
            return {**{column: stage_report(out / stage) for column, stage in MODELS.items()}, "schedule": schedule}

        return parts.run(name, run)

    settings_runs = [(f"{n} per class", f"kermany_{n}pc_seed{seed}", {"labeled_per_class": n, "seed": seed})
                     for n in args.per_class for seed in args.seeds]
    settings_runs += [("domain adaptation", f"adaptation_seed{seed}",
                       {"labeled_per_class": args.da_per_class, "seed": seed, "eval_source": eval_source})
                      for seed in args.da_seeds]
    results: dict[str, list[dict]] = {}
    for setting, name, values in settings_runs:
        results.setdefault(setting, []).append(dict(pipeline(name, **values)))  # a copy: parts.json keeps its own

    def kermany_only(seed: int) -> dict:
        """The GAN of the few-labels run with the same labeled images (``da_per_class``, ``seed``), which learnt from
        Kermany's unlabeled images, tested on the adult test images: its weights copied without their provenance
        record (they were trained on another split, none of whose images are the adult ones)."""
        out, trained = base / f"adaptation_seed{seed}", base / f"kermany_{args.da_per_class}pc_seed{seed}"
        weights = out / "kermany_only" / "ssl_gan.pt"

        def run() -> dict:
            weights.parent.mkdir(exist_ok=True)
            shutil.copyfile(trained / "ssl_gan" / "models" / "model.pt", weights)
            # an evaluation takes the data and tracking settings only, none of the training schedule's
            values = {k: common[k] for k in ("tracking_uri", "experiment_name", "dataset_dir", "image_size",
                                             "crop_size")}
            cli("run", "evaluate_ssl_gan", "kermany", "multiclass", "cpu_small", *settings(
                **values, labeled_per_class=args.da_per_class, seed=seed, eval_source=eval_source, output_dir=out,
                stage="ssl_gan_kermany_only", ckpt_path=weights), log=log)
            return {KERMANY_ONLY: stage_report(out / "ssl_gan_kermany_only"), "schedule": schedule}

        return parts.run(f"adaptation_seed{seed}/kermany_only", run)

    if args.da_per_class in args.per_class:
        for run, seed in zip(results.get("domain adaptation", []), args.da_seeds, strict=True):
            if seed in args.seeds:
                run.update(kermany_only(seed))

    rows, schedules = [], set()
    for setting, runs in results.items():
        for column in [*MODELS, KERMANY_ONLY]:
            if not all(column in r for r in runs):
                continue
            stats = summary([r[column] for r in runs])
            paper = PAPER.get(setting, {}).get(column)
            rows.append({"setting": setting, "model": column, "seeds": len(runs), **stats,
                         "paper's accuracy (%)": paper})
        schedules.update(r["schedule"] for r in runs)
    minutes = (time.perf_counter() - start) / 60
    print(json.dumps([{k: r[k] for k in ("setting", "model", "accuracy", "AUROC")} for r in rows], indent=1))
    write_results(__file__, {"rows": rows, "schedule": sorted(schedules),
                             "nih_pneumonia_vs_no_finding": nih_counts, "brightness": brightness,
                             "part_minutes": {k: v["minutes"] for k, v in parts.done.items()},
                             "minutes_this_run": round(minutes, 1)},
                  {**{k: str(v) for k, v in common.items() if k != "tracking_uri"},
                   "per_class": args.per_class, "seeds": args.seeds, "da_seeds": args.da_seeds,
                   "da_per_class": args.da_per_class})


if __name__ == "__main__":
    main()
