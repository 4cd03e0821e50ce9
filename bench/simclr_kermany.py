"""What SimCLR pre-training does on real chest X-rays: Kermany pediatric pneumonia (official test split), CPU-reduced.

One SimCLR pre-training on training images without their labels (``monai-cxr-ssl run simclr``: the labeled images
of the first λ and ``--simclr-images`` unlabeled ones, to fit the CPU budget), then at each
labeled fraction λ the teacher stage three ways, each evaluated on the test split with ten-crop TTA:

- **linear probe**: a new linear head on the frozen SimCLR encoder (``linear_probe=true``);
- **fine-tuned**: the whole network trained from the SimCLR encoder (``encoder_init``);
- **random init**: the same teacher from random weights, same split and epochs;

then teacher-student at the first λ with its teacher fine-tuned from the same SimCLR encoder, and the linear probe on
the NIH ChestX-ray14 sample (multi-label, per-class AUROC) as a check of the multi-label path. Every part runs as its
own ``monai-cxr-ssl`` command in its own folder and is recorded in ``<output-dir>/parts.json`` when it finishes: a
rerun skips the finished parts (and a part interrupted half-way resumes from its stage folders).

    python bench/simclr_kermany.py --output-dir runs/simclr_kermany    # about 75 minutes on 2 idle cores

Writes ``bench/results/simclr_kermany.json`` (the table, the SimCLR curves) and ``docs/simclr_kermany_curves.png``.
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
CURVES = REPO / "docs" / "simclr_kermany_curves.png"


def simclr_curves(tracking_uri: str, experiment: str) -> dict:
    """Per-epoch loss and contrastive accuracy of the SimCLR run, from MLflow."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id], filter_string="attributes.run_name LIKE 'simclr%'",
                                max_results=1, order_by=["attributes.start_time DESC"])
    curves = {}
    for key in ("train_loss", "contrastive_accuracy", "embedding_std"):
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        curves[key] = [round(m.value, 4) for m in history]
    return curves


def plot(curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=100)
    for ax, key, label in ((axes[0], "train_loss", "NT-Xent loss"),
                           (axes[1], "contrastive_accuracy", "contrastive accuracy")):
        values = curves.get(key) or []
        ax.plot(range(1, len(values) + 1), values, marker="o")
        ax.set(xlabel="epoch", ylabel=label, title=f"SimCLR on Kermany: {label}")
    fig.tight_layout()
    fig.savefig(CURVES)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED / "kermany_pneumonia"))
    parser.add_argument("--nih", default=str(SHARED / "chestxray14_sample"))
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "simclr_kermany"))
    parser.add_argument("--lambdas", type=float, nargs="*", default=[0.02, 0.1])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--simclr-epochs", type=int, default=10)
    parser.add_argument("--simclr-images", type=int, default=1200, help="unlabeled images SimCLR learns from")
    parser.add_argument("--teacher-epochs", type=int, default=6)
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        raise SystemExit(f"{args.data}: Kermany data not found; pass --data <kermany_pneumonia folder>.")
    base = Path(args.output_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    log = base / "bench.log"
    tracking_uri = f"sqlite:///{base / 'mlflow.db'}"
    common = {"dataset_dir": args.data, "tracking_uri": tracking_uri, "experiment_name": "simclr_kermany",
              "seed": args.seed, "val_interval": 2}
    parts = Parts(base / "parts.json")
    start = time.perf_counter()

    # 1. SimCLR on every training image (the split's training pool, the same at every λ), labels unused
    simclr_dir = base / "simclr"
    parts.run("simclr", lambda: (cli("run", "simclr", "kermany", "cpu_small", *settings(
        **common, output_dir=simclr_dir, labeled_fraction=args.lambdas[0], simclr_epochs=args.simclr_epochs,
        max_unlabeled=args.simclr_images),
        log=log), {"checkpoint": str(simclr_dir / "simclr" / "models" / "model.pt")})[1])
    encoder = simclr_dir / "simclr" / "models" / "model.pt"

    # 2. per λ: random init, fine-tuned from SimCLR, linear probe on the frozen SimCLR encoder
    variants = {"random init": {}, "fine-tuned": {"encoder_init": encoder},
                "linear probe": {"encoder_init": encoder, "linear_probe": "true"}}
    rows = []
    for fraction in args.lambdas:
        row = {"labeled": f"{fraction:.0%}"}
        for name, extra in variants.items():
            out = base / f"lambda{fraction}" / name.replace(" ", "_")

            def teacher(out=out, extra=extra, fraction=fraction) -> dict:
                overrides = {**common, "output_dir": out, "labeled_fraction": fraction,
                             "num_epochs": args.teacher_epochs, **extra}
                cli("run", "train", "kermany", "cpu_small", *settings(**overrides), log=log)
                cli("run", "evaluate", "kermany", "cpu_small", *settings(**overrides), log=log)
                return test_report(out / "teacher")

            row[name] = round(parts.run(f"lambda{fraction}/{name}", teacher)["mean_auroc"], 3)
        rows.append(row)

    # 3. teacher-student at the first λ, its teacher fine-tuned from the same SimCLR encoder
    fraction = args.lambdas[0]
    pipeline_dir = base / f"lambda{fraction}" / "simclr_teacher_student"

    def teacher_student() -> dict:
        cli("pipeline", "kermany", "cpu_small", *settings(
            **common, output_dir=pipeline_dir, labeled_fraction=fraction, **{"teacher:encoder_init": encoder},
            num_epochs=args.teacher_epochs, student_epochs=2, finetune_epochs=2, max_unlabeled=1000), log=log)
        return json.loads((pipeline_dir / "results-teacher_student.json").read_text())["auroc"]

    rows[0]["simclr + teacher-student (student)"] = round(
        parts.run(f"lambda{fraction}/simclr + teacher-student", teacher_student)["student"], 3)

    # 4. the linear probe on the NIH ChestX-ray14 sample: multi-label, per-class AUROC
    nih = {}
    if Path(args.nih).is_dir():
        out = base / "nih_linear_probe"

        def nih_probe() -> dict:
            overrides = {**common, "dataset_dir": args.nih, "output_dir": out, "labeled_fraction": 1.0,
                         "num_epochs": args.teacher_epochs, "encoder_init": encoder, "linear_probe": "true",
                         "experiment_name": "simclr_nih"}
            for stage in ("train", "evaluate"):
                cli("run", stage, "chestxray14_multilabel", "cpu_small", *settings(**overrides), log=log)
            return test_report(out / "teacher")

        nih = parts.run("nih linear probe", nih_probe)

    curves = simclr_curves(tracking_uri, "simclr_kermany")
    plot(curves)
    minutes = (time.perf_counter() - start) / 60
    print(json.dumps(rows, indent=1))
    epochs = [{"epoch": e + 1, **{k: v[e] for k, v in curves.items()}} for e in range(len(curves["train_loss"]))]
    nih_rows = [{"class": name, "test AUROC (linear probe)": None if v is None else round(v, 3)}
                for name, v in nih.get("auroc", {}).items()]
    write_results(__file__, {"rows": rows, "simclr_epochs": epochs, "nih_linear_probe": nih_rows,
                             "nih_linear_probe_mean_auroc": nih.get("mean_auroc"),
                             "nih_left_out": ", ".join(nih.get("left_out", [])) or "none",
                             "part_minutes": {k: v["minutes"] for k, v in parts.done.items()},
                             "minutes_this_run": round(minutes, 1)},
                  {**{k: str(v) for k, v in common.items()}, "lambdas": args.lambdas,
                   "simclr_epochs": args.simclr_epochs, "simclr_images": args.simclr_images,
                   "teacher_epochs": args.teacher_epochs,
                   "image_size": 64, "crop_size": 56})


if __name__ == "__main__":
    main()
