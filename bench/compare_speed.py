"""How long ``monai-cxr-ssl compare`` takes on an experiment of many runs (default 500), in a fresh SQLite store.

Generates evaluation runs as the bundle's evaluate config logs them (params, test AUROC metrics, a predictions
artifact), then times ``compare.run_compare`` (search, table, CSV, plots, summary run) against a baseline measured
in the same process: one plain ``MlflowClient.search_runs`` page walk over the same runs. Writes
``bench/results/compare_speed.json``.

    python bench/compare_speed.py --runs 500
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
from _results import write_results  # a sibling module: bench/ is on sys.path when run as bench/<script>.py
from mlflow.entities import Metric, Param

from monai_cxr_ssl.compare import run_compare

STAGES = ("teacher", "student", "finetune", "mean_teacher")
LAMBDAS = (0.02, 0.05, 0.1, 0.2, 1.0)


def generate(client: mlflow.MlflowClient, experiment: str, n: int, folder: Path) -> None:
    rng = np.random.default_rng(0)
    predictions = folder / "test_predictions.npz"
    labels = rng.integers(0, 2, size=(624, 1)).astype(np.float32)
    np.savez(predictions, labels=labels, probs=np.clip(labels * 0.6 + rng.random(labels.shape) * 0.5, 0, 1))
    now = int(time.time() * 1000)
    for i in range(n):
        stage, fraction, seed = STAGES[i % 4], LAMBDAS[(i // 4) % 5], i // 20
        run = client.create_run(experiment, run_name=f"{stage}-lambda{fraction}-seed{seed}-evaluate").info.run_id
        params = {"stage": stage, "labeled_fraction": fraction, "seed": seed, "eval_split": "test",
                  "image_size": 64, "crop_size": 56, "dataset_fingerprint": "abc"}
        client.log_batch(run, params=[Param(k, str(v)) for k, v in params.items()],
                         metrics=[Metric("test_mean_auroc", float(0.7 + 0.2 * rng.random()), now, 0),
                                  Metric("test_auroc_PNEUMONIA", float(0.7 + 0.2 * rng.random()), now, 0)])
        client.log_artifact(run, str(predictions))
        client.set_terminated(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = client.create_experiment("bench", artifact_location=(folder / "artifacts").as_uri())
        start = time.perf_counter()
        generate(client, experiment, args.runs, folder)
        generated = time.perf_counter() - start
        print(f"generated {args.runs} evaluation runs in {generated:.1f} s", flush=True)

        start = time.perf_counter()
        count, token = 0, None
        while True:
            page = client.search_runs([experiment], max_results=1000, page_token=token)
            count += len(page)
            token = page.token
            if not token:
                break
        baseline = time.perf_counter() - start

        start = time.perf_counter()
        result = run_compare(["bench"], folder / "out", tracking_uri=uri)
        seconds = time.perf_counter() - start
    print(result["markdown"])
    print(f"plain search_runs over {count} runs: {baseline:.2f} s")
    print(f"compare ({result['num_runs']} evaluations after de-duplication; table, CSV, 2 plots, summary run): "
          f"{seconds:.2f} s ({seconds / baseline:.1f}x the plain search)")
    write_results(__file__, {"runs": count, "evaluations_after_deduplication": result["num_runs"],
                             "generate_s": round(generated, 1), "plain_search_runs_s": round(baseline, 2),
                             "compare_s": round(seconds, 2), "compare_over_search": round(seconds / baseline, 1)},
                  {"runs": args.runs})


if __name__ == "__main__":
    main()
