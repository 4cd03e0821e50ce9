"""Pseudo-labelling: throughput against a plain forward pass, and peak memory against the number of images.

1. throughput: the pseudo-label bundle's evaluator (``TenCropInferer``, sigmoid post-processing, the real
   ``PseudoLabelWriter`` streaming to a JSONL file and the ``BalancedFilter`` at the end) against a plain
   ``network(crops).sigmoid()`` over the same ten crops cut beforehand, DenseNet121, in-memory images, timed
   alternately in the same run;
2. memory: peak resident memory of a process that pseudo-labels 5,000 and then (in a fresh process) 50,000
   images through the same evaluator and handlers. Images are generated on the fly and the network is a small
   CNN so that 50,000 images take a minute on CPU; what is measured is whether anything accumulates per image.

Prints figures and ratios and writes them to ``bench/results/pseudo_label_speed.json``; asserts nothing.

    python bench/pseudo_label_speed.py
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from monai.data import DataLoader, Dataset

from monai_cxr_ssl.handlers import BalancedFilter, PseudoLabelWriter
from monai_cxr_ssl.transforms import ten_crop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results  # noqa: E402
from throughput import bundle_parser, timed_pair  # noqa: E402


class GeneratedImages(Dataset):
    """``n`` random images made when read, so the dataset itself holds nothing per image."""

    def __init__(self, n: int, size: int) -> None:
        super().__init__(data=range(n))
        self.size = size

    def _transform(self, index: int) -> dict:
        g = torch.Generator().manual_seed(index)
        return {"image": torch.rand(1, self.size, self.size, generator=g), "label": torch.tensor([index % 2.0]),
                "id": f"img{index:06d}"}


def pseudo_label_evaluator(args: argparse.Namespace, n: int, out_dir: Path, network: torch.nn.Module | None = None):
    """The pseudo-label stage's evaluator over ``n`` generated images, with its writer and filter handlers."""
    parser = bundle_parser(args, "train.json", "predict.json", "pseudo_label.json")
    loader = DataLoader(GeneratedImages(n, args.image_size), batch_size=args.batch_size, num_workers=0)
    split = {
        "fingerprint": "bench",
        "split_fingerprint": "bench",
        "unlabeled": [{"image": "", "id": f"img{i:06d}", "label": [i % 2.0]} for i in range(n)],
        "labeled": [{"label": [1.0]}, {"label": [0.0]}],
    }
    writer = PseudoLabelWriter(out_dir / "pseudo_labels.jsonl", ["positive"], "bench", __file__,
                               split_fingerprint="bench", include_labels=True)
    balanced = BalancedFilter(writer.output_file, split, out_dir / "filtered.json")
    parser["validate#dataloader"] = loader
    parser["validate#handlers"] = [writer, balanced]
    if network is not None:
        parser["network"] = network
    return parser.get_parsed_content("validate#evaluator"), parser.get_parsed_content("network"), loader


def bench_throughput(args: argparse.Namespace) -> dict:
    n = args.batch_size * args.iterations
    with tempfile.TemporaryDirectory() as tmp:
        evaluator, network, loader = pseudo_label_evaluator(args, n, Path(tmp))
        network.eval()
        crops = [ten_crop(batch["image"], args.crop_size).flatten(0, 1).contiguous() for batch in loader]

        def plain():
            with torch.no_grad():
                for c in crops:
                    network(c).sigmoid()

        plain_s, engine_s = timed_pair(plain, evaluator.run, args.repeats)
    print(f"throughput  plain forward          : {n / plain_s:8.1f} images/s (10 crops each, cut beforehand)")
    print(f"throughput  pseudo-label evaluator : {n / engine_s:8.1f} images/s   ratio = {plain_s / engine_s:.3f}")
    return {"plain_images_per_s": round(n / plain_s, 1), "evaluator_images_per_s": round(n / engine_s, 1),
            "evaluator_over_plain": round(plain_s / engine_s, 3)}


def tiny_network() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 1),
    )


def memory_child(args: argparse.Namespace) -> None:
    """Pseudo-label ``args.memory_child`` images and print the peak RSS before and after the pass."""
    n = args.memory_child
    with tempfile.TemporaryDirectory() as tmp:
        evaluator, _, _ = pseudo_label_evaluator(args, n, Path(tmp), tiny_network())
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        evaluator.run()
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        size = (Path(tmp) / "pseudo_labels.jsonl").stat().st_size
    print(f"{n} {before} {after} {seconds:.1f} {size}")


def bench_memory(args: argparse.Namespace) -> list[dict]:
    base = [sys.executable, __file__, "--image-size", str(args.image_size), "--crop-size", str(args.crop_size),
            "--batch-size", str(args.batch_size)]
    rows = []
    for n in args.memory_sizes:
        out = subprocess.run([*base, "--memory-child", str(n)], capture_output=True, text=True, check=True)
        count, before, after, seconds, size = out.stdout.split()[-5:]
        print(
            f"memory      {int(count):6d} images : peak RSS {int(after) / 1024:7.1f} MiB (before the pass "
            f"{int(before) / 1024:7.1f} MiB, growth {(int(after) - int(before)) / 1024:6.1f} MiB), "
            f"{float(seconds):6.1f} s, file {int(size) / 2**20:.1f} MiB"
        )
        rows.append({"images": int(count), "peak_rss_mib": round(int(after) / 1024, 1),
                     "rss_before_pass_mib": round(int(before) / 1024, 1),
                     "growth_mib": round((int(after) - int(before)) / 1024, 1), "seconds": float(seconds),
                     "file_mib": round(int(size) / 2**20, 1)})
    return rows


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--image-size", type=int, default=64)
    cli.add_argument("--crop-size", type=int, default=56)
    cli.add_argument("--batch-size", type=int, default=16)
    cli.add_argument("--iterations", type=int, default=10, help="batches per timed pass (throughput)")
    cli.add_argument("--repeats", type=int, default=5)
    cli.add_argument("--memory-sizes", type=int, nargs="+", default=[5000, 50000])
    cli.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = cli.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image {args.image_size}, "
          f"crop {args.crop_size}, batch {args.batch_size}")
    figures = bench_throughput(args)
    figures["rows"] = bench_memory(args)
    settings = {k: v for k, v in vars(args).items() if k != "memory_child"}
    write_results(__file__, figures, settings)


if __name__ == "__main__":
    main()
