"""Latency of the MONAI Deploy app per study on the real DICOM files, and where the time goes.

For each file of ``../shared/data/dicom`` (one study each) the whole app (input checks, SDK loader, series
selection, classifier, JSON and SR writers, publishing) runs in-process ``--repeats`` times after one warm-up;
the same study's DICOM loading (pydicom read + the bundle's conversion) and model inference (resize, ten crops,
TorchScript forward) are timed alone, giving their shares of the app's latency. The start-up of a fresh
``python -m monai_cxr_ssl.deploy`` process (imports, Holoscan) is reported separately. Writes
``bench/results/deploy_latency.json``.

    python bench/deploy_latency.py                      # a random-weight model at 256/224, as the paper
    python bench/deploy_latency.py --model model.ts     # a model from monai-cxr-ssl export
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import torch
from _results import write_results  # sibling modules: bench/ is on sys.path when run as bench/<script>.py
from filter_speed import median_time
from monai.data import save_net_with_metadata

from monai_cxr_ssl.data import dicom_to_image
from monai_cxr_ssl.deploy.app import load_model, main
from monai_cxr_ssl.deploy.operators import predict
from monai_cxr_ssl.networks import CXRDenseNet121
from monai_cxr_ssl.workflow import DEFAULT_BUNDLE, REPO_ROOT


def random_model(path: Path, image_size: int, crop_size: int) -> Path:
    meta = json.loads((DEFAULT_BUNDLE / "configs" / "metadata.json").read_text())
    meta["cxr_ssl"] = {"classes": ["Effusion"], "image_size": image_size, "crop_size": crop_size,
                       "thresholds": {"Effusion": 0.5}, "stage": "benchmark"}
    net = CXRDenseNet121(num_classes=1, probabilities="sigmoid").eval()
    save_net_with_metadata(torch.jit.script(net), str(path), meta_values=meta)
    return path


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    return median_time(fn, repeats)


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dicom-dir", default=str(REPO_ROOT.parent / "shared" / "data" / "dicom"))
    parser.add_argument("--model", default=None, help="TorchScript from monai-cxr-ssl export (default: random)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    files = sorted(Path(args.dicom_dir).glob("*.dcm"))
    if not files:
        raise SystemExit(f"{args.dicom_dir}: no DICOM files; pass --dicom-dir <folder of .dcm files>.")
    logging.disable(logging.INFO)  # the SDK logs every selection step at INFO: keep the console to the figures

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model:
            model_path = Path(args.model)
            source = f"model {model_path}"
        else:
            model_path = random_model(tmp / "model.ts", args.image_size, args.crop_size)
            source = f"random-weight DenseNet121 exported at {args.image_size}/{args.crop_size}"
        model, meta, _, _ = load_model(model_path)
        info = meta["cxr_ssl"]
        print(f"MONAI Deploy app latency, {source}; median of {args.repeats} runs after a warm-up, "
              f"{torch.get_num_threads()} CPU threads")
        print("| study | app latency (s) | DICOM loading (s, share) | model inference (s, share) | other |")
        print("|---|---|---|---|---|")
        totals, rows = [], []
        for k, file in enumerate(files):
            study = tmp / f"study{k}"
            study.mkdir()
            (study / file.name).write_bytes(file.read_bytes())
            out = tmp / f"out{k}"

            def app(study=study, out=out):
                with contextlib.redirect_stdout(io.StringIO()):  # the app's "wrote <file>" lines
                    code = main(["app", "-i", str(study), "-o", str(out), "-m", str(model_path), "-l", "ERROR",
                                 "--accept-unknown-body-part"])
                if code != 0:
                    raise SystemExit(f"the app failed on {study}")

            def load(file=file):
                return dicom_to_image(pydicom.dcmread(file), file)

            image = load()
            latency = timed(app, args.repeats)
            loading = timed(load, args.repeats)
            inference = timed(lambda image=image: predict(model, image, info["image_size"], info["crop_size"]),
                              args.repeats)
            other = latency - loading - inference
            totals.append((latency, loading, inference))
            rows.append({"study": f"{file.name} ({image.shape[0]}x{image.shape[1]})",
                         "app_latency_s": round(latency, 3), "dicom_loading_s": round(loading, 3),
                         "model_inference_s": round(inference, 3), "other_s": round(other, 3)})
            print(f"| {file.name} ({image.shape[0]}x{image.shape[1]}) | {latency:.3f} | {loading:.3f} "
                  f"({loading / latency:.0%}) | {inference:.3f} ({inference / latency:.0%}) | {other:.3f} "
                  f"({other / latency:.0%}) |")
        latency, loading, inference = (statistics.mean(column) for column in zip(*totals, strict=True))
        print(f"| mean | {latency:.3f} | {loading:.3f} ({loading / latency:.0%}) | {inference:.3f} "
              f"({inference / latency:.0%}) | {latency - loading - inference:.3f} |")

        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "monai_cxr_ssl.deploy", "-i", str(tmp / "study0"), "-o",
                              str(tmp / "out_cli"), "-m", str(model_path), "--accept-unknown-body-part"],
                             capture_output=True, text=True)
        wall = time.perf_counter() - start
        if run.returncode != 0:
            raise SystemExit(run.stderr[-2000:])
        print(f"\none fresh `python -m monai_cxr_ssl.deploy` process on {files[0].name}: {wall:.1f} s wall "
              f"(start-up: imports of torch, MONAI and Holoscan, graph set-up: about {wall - totals[0][0]:.1f} s)")
    write_results(__file__, {"rows": rows, "fresh_process_s": round(wall, 1),
                             "fresh_process_startup_s": round(wall - totals[0][0], 1)},
                  {"model": source, "repeats": args.repeats, "image_size": info["image_size"],
                   "crop_size": info["crop_size"], "studies": len(files)})


if __name__ == "__main__":
    main_bench()
