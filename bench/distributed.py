"""The teacher stage on one process against N torchrun processes with the same global batch, in one run.

1. stage: ``monai-cxr-ssl run train`` on one process (batch B) and with ``--nproc-per-node N`` (batch B/N per
   process), on the same synthetic images and split; images/s of training (first batch to last step of each epoch
   after the first, from ``bench/_epoch_timer.py``; no validation), and their ratio;
2. communication: under torchrun, the DDP step of the bundle's DenseNet121 at batch B/N with its gradient all-reduce
   and without it (``no_sync``), same batches; the all-reduce's share of the step.

On CPUs the processes share the cores (expect no gain: the ratio shows DDP's overhead); with GPUs, one process per
GPU. Prints the figures and writes ``bench/results/distributed.json``; asserts nothing.

    python bench/distributed.py                       # 2 gloo processes on this machine
    python bench/distributed.py --nproc-per-node 8    # a machine with 8 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TIMER = BENCH / "epoch_timer.json"  # the overlay that adds _epoch_timer.EpochTimer


def stage_images_per_s(args: argparse.Namespace, root: Path, data: Path, nproc: int) -> float:
    """Training images/s of the teacher stage, over the epochs after the first."""
    out, times = root / f"out{nproc}", root / f"times{nproc}.json"
    out.mkdir()
    if (root / "split.json").exists():
        (out / "split.json").write_bytes((root / "split.json").read_bytes())  # the same split for every run
    settings = {"dataset_dir": data, "output_dir": out, "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
                "image_size": args.image_size, "crop_size": args.crop_size, "batch_size": args.batch_size // nproc,
                "num_epochs": args.epochs, "val_interval": args.epochs + 1, "labeled_fraction": 1.0,
                "num_workers": 0, "cache_rate": 1.0, "epoch_times_file": times}
    command = [sys.executable, "-m", "monai_cxr_ssl.cli", "run", "train", "demo", str(TIMER),
               *(["--nproc-per-node", str(nproc)] if nproc > 1 else []),
               "--set", *(f"{k}={v}" for k, v in settings.items())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    if not (root / "split.json").exists():
        (root / "split.json").write_bytes((out / "split.json").read_bytes())
    epochs = json.loads(times.read_text())[1:]  # the first epoch warms up
    return sum(e["images"] for e in epochs) / sum(e["seconds"] for e in epochs)


def communication_worker(args: argparse.Namespace) -> None:
    """Under torchrun: median step time with and without DDP's all-reduce; rank 0 prints them as JSON."""
    import torch

    from monai_cxr_ssl import distributed
    from monai_cxr_ssl.networks import CXRDenseNet121

    device = distributed.init_process_group()
    network = distributed.data_parallel(CXRDenseNet121(num_classes=1), device)
    optimizer = torch.optim.Adam(network.parameters(), 1e-4)
    loss = torch.nn.BCEWithLogitsLoss()
    batch = args.batch_size // distributed.world_size()
    images = torch.rand(batch, 1, args.crop_size, args.crop_size, device=device)
    labels = torch.randint(0, 2, (batch, 1), device=device).float()

    def step(sync: bool) -> float:
        distributed.barrier()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with network.no_sync() if not sync else torch.enable_grad():
            loss(network(images), labels).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    step(True), step(False)
    timings: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.steps):
        for sync in (True, False):
            timings[sync].append(step(sync))
    if distributed.is_main_process():
        print(json.dumps({"with_allreduce_s": statistics.median(timings[True]),
                          "without_allreduce_s": statistics.median(timings[False])}))
    distributed.destroy_process_group()


def communication_share(args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc_per_node}",
               __file__, "--communication-worker", "--batch-size", str(args.batch_size), "--crop-size",
               str(args.crop_size), "--steps", str(args.steps)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    times = json.loads(done.stdout.strip().splitlines()[-1])
    share = 1.0 - times["without_allreduce_s"] / times["with_allreduce_s"]
    return {"step_with_allreduce_ms": round(1000 * times["with_allreduce_s"], 1),
            "step_without_allreduce_ms": round(1000 * times["without_allreduce_s"], 1),
            "allreduce_share_of_step": round(share, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc-per-node", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--crop-size", type=int, default=56)
    parser.add_argument("--batch-size", type=int, default=16, help="the global batch (per process: / N)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=320, help="synthetic training images")
    parser.add_argument("--steps", type=int, default=10, help="steps per variant of the communication part")
    parser.add_argument("--communication-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.communication_worker:
        communication_worker(args)
        return
    if args.batch_size % args.nproc_per_node:
        sys.exit("--batch-size must be a multiple of --nproc-per-node (the same global batch on both sides)")
    from _results import write_results  # a sibling module: bench/ is on sys.path when run as bench/<script>.py

    from monai_cxr_ssl.data import make_synthetic_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_synthetic_dataset(root / "data", n_train=args.n_train, n_test=16, image_size=args.image_size,
                                      prevalence=0.4, seed=0)
        one = stage_images_per_s(args, root, data, 1)
        print(f"teacher stage, 1 process, batch {args.batch_size}: {one:8.1f} images/s")
        many = stage_images_per_s(args, root, data, args.nproc_per_node)
        print(f"teacher stage, {args.nproc_per_node} processes, batch {args.batch_size // args.nproc_per_node} each: "
              f"{many:8.1f} images/s   ratio {many / one:.3f}")
    communication = communication_share(args)
    print(f"DDP step at batch {args.batch_size // args.nproc_per_node} per process: "
          f"{communication['step_with_allreduce_ms']} ms with the gradient all-reduce, "
          f"{communication['step_without_allreduce_ms']} ms without: share {communication['allreduce_share_of_step']}")
    import torch

    write_results(__file__, {
        "stage": {"one_process_images_per_s": round(one, 1), "n_processes_images_per_s": round(many, 1),
                  "n_over_one": round(many / one, 3)},
        "communication": communication,
    }, {**{k: v for k, v in vars(args).items() if k != "communication_worker"},
        "backend": "nccl" if torch.cuda.is_available() else "gloo"})


if __name__ == "__main__":
    main()
