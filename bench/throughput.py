"""Throughput of the teacher bundle's pieces against hand-written baselines measured in the same run.

1. training: a plain PyTorch loop vs the bundle's ignite ``SupervisedTrainer`` (same network,
   optimizer, loss, batches; in-memory data, so only the engine differs);
2. inference: the bundle's evaluator with ``TenCropInferer`` vs a plain forward pass over the
   same ten crops, cut beforehand;
3. mean teacher: the bundle's ``MeanTeacherTrainer`` (the semi-supervised trainer, its ``EMAHandler`` teacher)
   vs a plain PyTorch loop doing the same work per iteration (teacher forward and AALS targets on the unlabeled
   batch, one student forward on labeled + unlabeled images, BCE + Bernoulli KL, step, EMA of parameters and
   float buffers), same networks and batches;
4. SimCLR: the bundle's SimCLR stage step (MONAI's ``SupervisedTrainer`` with the two-view batch, the NT-Xent loss
   and the per-epoch contrastive metrics) vs a plain PyTorch loop doing the same forward/backward (two views in
   one forward, NT-Xent, step), same network and batches; and the loss alone at batch 256 (128-d projections):
   ``losses.NTXentLoss`` against ``monai.losses.ContrastiveLoss`` at the same temperature, time and peak memory
   (each in a fresh process: its peak resident memory above what it held before the loss, Linux's VmHWM after
   resetting it);
5. S²MTS²: the bundle's pre-training step (MONAI's ``SupervisedTrainer`` with the query view as input and the key
   views as target, ``MomentumContrastLoss``: shuffled key forwards, the joint contrastive loss, the enqueue; the
   key encoder's ``EMAHandler``) vs a plain PyTorch loop doing the same work; and the memory of a 65,536 x 128 queue;
6. semi-supervised GAN: the bundle's ``SemiSupervisedGanTrainer`` (the discriminator step on labeled, unlabeled and
   generated images, the generator's feature matching, the discriminator's ``EMAHandler``) vs a plain PyTorch GAN
   loop doing the same work, same networks and batches, at 64 x 64 (a size the generator makes);
7. data: the bundle's training pre-processing (decode, resize, augment) on the real Kermany JPEGs,
   against the training throughput at the same size.

Prints images/s and ratios; asserts nothing.  Example (CPU size of the real-data benchmarks):

    python bench/throughput.py --image-size 64 --crop-size 56 --batch-size 16
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _results import write_results  # a sibling module: bench/ is on sys.path when run as bench/<script>.py
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset

from monai_cxr_ssl.transforms import ten_crop

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "cxr_classifier" / "configs"
KERMANY = REPO.parent / "shared" / "data" / "kermany_pneumonia"


def bundle_parser(args: argparse.Namespace, *configs: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in configs])
    parser.update(
        {"bundle_root": str(CONFIGS.parent), "image_size": args.image_size, "crop_size": args.crop_size,
         "batch_size": args.batch_size, "num_workers": 0, "device": "$torch.device('cpu')",
         "network_def#num_classes": 1}  # one finding, without reading a dataset's split
    )
    return parser


def in_memory_loader(args: argparse.Namespace, size: int, unlabeled: bool = False,
                     view_key: str = "image_teacher") -> DataLoader:
    """Random images with labels, or (``unlabeled``) with a second view as ``view_key`` instead."""
    g = torch.Generator().manual_seed(1 if unlabeled else 0)
    n = args.batch_size * args.iterations
    if unlabeled:
        items = [{"image": torch.rand(1, size, size, generator=g), view_key: torch.rand(1, size, size, generator=g)}
                 for _ in range(n)]
    else:
        items = [{"image": torch.rand(1, size, size, generator=g), "label": torch.randint(0, 2, (1,)).float()}
                 for _ in range(n)]
    return DataLoader(Dataset(items), batch_size=args.batch_size, shuffle=False, num_workers=0)


def timed_pair(baseline, candidate, repeats: int) -> tuple[float, float]:
    """Median wall times of ``baseline()`` and ``candidate()``, measured alternately after a warm-up of each,
    so that drifts in machine load affect both alike."""
    baseline(), candidate()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in zip((baseline, candidate), times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def pair_figures(n: int, plain_s: float, engine_s: float) -> dict:
    """Images/s of a baseline and the bundle's engine over the same ``n`` images, and their ratio."""
    return {"plain_images_per_s": round(n / plain_s, 1), "engine_images_per_s": round(n / engine_s, 1),
            "engine_over_plain": round(plain_s / engine_s, 3)}


def one_more_epoch(trainer):
    """A callable that runs ``trainer`` for one more full epoch on every call."""

    def run():
        trainer.state.max_epochs = trainer.state.epoch + 1
        trainer.run()

    return run


def bench_training(args: argparse.Namespace) -> dict:
    loader = in_memory_loader(args, args.crop_size)
    parser = bundle_parser(args, "train.json")
    parser["train#dataloader"] = loader
    parser["train#handlers"] = []
    trainer = parser.get_parsed_content("train#trainer")
    network, optimizer, loss_fn = (parser.get_parsed_content(k) for k in ("network", "optimizer", "loss"))

    def plain():
        network.train()
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(network(batch["image"]), batch["label"])
            loss.backward()
            optimizer.step()

    engine = one_more_epoch(trainer)

    n = len(loader.dataset)
    plain_s, engine_s = timed_pair(plain, engine, args.repeats)
    print(f"training   plain PyTorch loop : {n / plain_s:8.1f} images/s")
    print(f"training   bundle trainer     : {n / engine_s:8.1f} images/s   engine/plain = {plain_s / engine_s:.3f}")
    return pair_figures(n, plain_s, engine_s)


def bench_mean_teacher(args: argparse.Namespace) -> dict:
    from monai_cxr_ssl.losses import BernoulliKLDivLoss
    from monai_cxr_ssl.sharpening import aals

    loader, unlabeled = in_memory_loader(args, args.crop_size), in_memory_loader(args, args.crop_size, unlabeled=True)
    parser = bundle_parser(args, "train.json", "mean_teacher.json")
    parser["train#dataloader"], parser["train#unlabeled#dataloader"] = loader, unlabeled
    parser["train#handlers"] = []  # the trainer keeps its EMA handler
    parser["rampup_epochs"] = 0  # the full consistency weight from the start, as in the plain loop
    trainer = parser.get_parsed_content("train#trainer")
    network, teacher, optimizer, loss_fn = (parser.get_parsed_content(k)
                                            for k in ("network", "teacher_network", "optimizer", "loss"))
    alpha, weight, t, a0 = (parser.get_parsed_content(k) for k in ("ema_decay", "consistency_weight", "aals_t",
                                                                     "aals_a0"))
    kl = BernoulliKLDivLoss()

    def plain():
        network.train()
        teacher.eval()
        for batch, extra in zip(loader, unlabeled, strict=True):
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                targets = aals(torch.sigmoid(teacher(extra["image_teacher"])), t, a0)
            logits = network(torch.cat([batch["image"], extra["image"]]))
            n = len(batch["image"])
            loss = loss_fn(logits[:n], batch["label"]) + weight * kl(logits[n:], targets)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for t_p, s_p in zip(teacher.parameters(), network.parameters(), strict=True):
                    t_p.mul_(alpha).add_(s_p, alpha=1.0 - alpha)
                for t_b, s_b in zip(teacher.buffers(), network.buffers(), strict=True):
                    if t_b.dtype.is_floating_point:
                        t_b.mul_(alpha).add_(s_b, alpha=1.0 - alpha)
                    else:
                        t_b.copy_(s_b)

    engine = one_more_epoch(trainer)

    n = len(loader.dataset)
    plain_s, engine_s = timed_pair(plain, engine, args.repeats)
    print(f"mean-teacher plain PyTorch loop : {n / plain_s:8.1f} images/s (labeled, + as many unlabeled)")
    print(f"mean-teacher bundle trainer     : {n / engine_s:8.1f} images/s   engine/plain = "
          f"{plain_s / engine_s:.3f}")
    return pair_figures(n, plain_s, engine_s)


def bench_tta(args: argparse.Namespace) -> dict:
    loader = in_memory_loader(args, args.image_size)
    parser = bundle_parser(args, "train.json", "predict.json", "evaluate.json")
    parser["validate#dataloader"] = loader
    parser["validate#handlers"] = []
    evaluator = parser.get_parsed_content("validate#evaluator")
    network = parser.get_parsed_content("network").eval()
    crops = [ten_crop(batch["image"], args.crop_size).flatten(0, 1).contiguous() for batch in loader]

    def plain():
        with torch.no_grad():
            for c in crops:
                network(c).sigmoid()

    n = len(loader.dataset)
    plain_s, engine_s = timed_pair(plain, evaluator.run, args.repeats)
    print(f"ten-crop   plain forward      : {n / plain_s:8.1f} images/s (10 crops each, cut beforehand)")
    print(f"ten-crop   bundle evaluator   : {n / engine_s:8.1f} images/s   engine/plain = {plain_s / engine_s:.3f}")
    return pair_figures(n, plain_s, engine_s)


def bench_simclr(args: argparse.Namespace) -> dict:
    from monai_cxr_ssl.losses import NTXentLoss

    loader = in_memory_loader(args, args.crop_size, unlabeled=True, view_key="image_2")
    parser = bundle_parser(args, "train.json", "label_free.json", "simclr.json")
    parser["network_def"] = {"_target_": "monai_cxr_ssl.networks.SimCLRNetwork"}  # no classes
    parser["train#dataloader"] = loader
    parser["train#handlers"] = []  # the trainer keeps its collapse warning
    trainer = parser.get_parsed_content("train#trainer")
    network, optimizer = (parser.get_parsed_content(k) for k in ("network", "optimizer"))
    loss_fn = NTXentLoss(temperature=parser.get_parsed_content("temperature"), gather=False)

    def plain():
        network.train()
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            z1, z2 = network(torch.cat([batch["image"], batch["image_2"]])).chunk(2)
            loss_fn(z1, z2).backward()
            optimizer.step()

    n = len(loader.dataset)
    plain_s, engine_s = timed_pair(plain, one_more_epoch(trainer), args.repeats)
    print(f"simclr     plain PyTorch loop : {n / plain_s:8.1f} images/s (two views each)")
    print(f"simclr     bundle trainer     : {n / engine_s:8.1f} images/s   engine/plain = {plain_s / engine_s:.3f}")
    return pair_figures(n, plain_s, engine_s)


def bench_s2mts2(args: argparse.Namespace, key_views: int = 2) -> dict:
    from monai_cxr_ssl.methods.s2mts2.engine import KeyQueue

    g = torch.Generator().manual_seed(2)
    views = ["image", *(f"image_{i + 2}" for i in range(key_views))]
    items = [{v: torch.rand(1, args.crop_size, args.crop_size, generator=g) for v in views}
             for _ in range(args.batch_size * args.iterations)]
    loader = DataLoader(Dataset(items), batch_size=args.batch_size, shuffle=False, num_workers=0)
    parser = bundle_parser(args, "train.json", "label_free.json", "simclr.json", "s2mts2_pretrain.json")
    parser["network_def"] = {"_target_": "monai_cxr_ssl.networks.SimCLRNetwork"}
    parser["train#dataloader"] = loader
    parser["train#handlers"] = []  # the trainer keeps the key encoder's EMA, the λ ramp and the collapse warning
    parser["queue_size"] = args.batch_size * args.iterations * 4
    trainer = parser.get_parsed_content("train#trainer")
    network, optimizer, loss_fn = (parser.get_parsed_content(k) for k in ("network", "optimizer", "loss"))
    momentum = 1.0 - parser.get_parsed_content("key_momentum")
    key_network, queue, joint = loss_fn.key_network, KeyQueue(parser.get_parsed_content("queue_size")), loss_fn.loss

    def plain():  # the same work: query forward, shuffled key forwards without gradient, loss, step, EMA, enqueue
        network.train()
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            q = torch.nn.functional.normalize(network(batch["image"]), dim=1)
            with torch.no_grad():
                key_network.train()  # BatchNorm on the key batch's statistics, as the stage's key forwards
                flat = torch.stack([batch[v] for v in views[1:]], dim=1).flatten(0, 1)
                order = torch.randperm(len(flat))
                encoded = torch.cat([key_network(flat[part]) for part in order.chunk(2)])
                keys = torch.empty_like(encoded)
                keys[order] = encoded
                keys = torch.nn.functional.normalize(keys, dim=1).view(len(q), key_views, -1)
            joint(q, keys, queue.entries.clone()).backward()
            optimizer.step()
            with torch.no_grad():
                for e, m in zip(key_network.parameters(), network.parameters(), strict=True):
                    e.mul_(1 - momentum).add_(m, alpha=momentum)
                for e, m in zip(key_network.buffers(), network.buffers(), strict=True):
                    if e.is_floating_point():
                        e.mul_(1 - momentum).add_(m, alpha=momentum)
                queue.enqueue(keys.mean(dim=1))

    n = len(loader.dataset)
    plain_s, engine_s = timed_pair(plain, one_more_epoch(trainer), args.repeats)
    full = KeyQueue(65536, 128)
    queue_mb = sum(b.numel() * b.element_size() for b in full.buffers()) / 2**20
    print(f"s2mts2     plain PyTorch loop : {n / plain_s:8.1f} images/s (1 query + {key_views} key views each)")
    print(f"s2mts2     bundle trainer     : {n / engine_s:8.1f} images/s   engine/plain = {plain_s / engine_s:.3f}")
    print(f"s2mts2     queue of 65,536 x 128 : {queue_mb:.1f} MiB")
    return {**pair_figures(n, plain_s, engine_s), "key_views": key_views, "queue_65536x128_mib": round(queue_mb, 1)}


def bench_ssl_gan(args: argparse.Namespace, size: int = 64) -> dict:
    """The semi-supervised GAN's step at the generator's ``size`` (the next one up from the usual 56 crops)."""
    from monai_cxr_ssl.losses import FeatureMatchingLoss, SemiSupervisedGANLoss
    from monai_cxr_ssl.networks.gan import real_class_logits

    g = torch.Generator().manual_seed(3)
    n = args.batch_size * args.iterations
    labeled = [{"image": torch.rand(1, size, size, generator=g), "label": torch.eye(2)[k % 2]} for k in range(n)]
    unlabeled = [{"image": torch.rand(1, size, size, generator=g)} for _ in range(n)]
    loaders = [DataLoader(Dataset(items), batch_size=args.batch_size, shuffle=False, num_workers=0)
               for items in (labeled, unlabeled)]
    parser = bundle_parser(args, "train.json", "ssl_gan_network.json", "ssl_gan.json")
    parser.update({"image_size": size, "crop_size": size, "network_def#num_classes": 3,
                   "train#dataloader": loaders[0], "train#unlabeled#dataloader": loaders[1],
                   "train#trainer#train_handlers": "$[@train#d_ema]"})  # the discriminator's EMA is the method's
    trainer = parser.get_parsed_content("train#trainer")
    d_net, g_net, d_opt, g_opt = (parser.get_parsed_content(k) for k in ("network", "generator", "optimizer",
                                                                         "g_optimizer"))
    ema = parser.get_parsed_content("train#d_ema").ema_model
    momentum = 1.0 - parser.get_parsed_content("discriminator_ema_decay")
    gan_loss, matching, latent = SemiSupervisedGANLoss(), FeatureMatchingLoss(), parser.get_parsed_content("latent_dim")

    def plain():  # the same work: discriminator step on labeled + unlabeled + detached fakes, generator step, EMA
        d_net.train(), g_net.train()
        for batch, extra in zip(*loaders, strict=True):
            x, u = batch["image"], extra["image"]
            with torch.no_grad():
                fakes = g_net(torch.randn(len(u), latent))
            d_opt.zero_grad(set_to_none=True)
            logits = real_class_logits(d_net(torch.cat([x, u, fakes])))
            gan_loss(logits[:len(x)], batch["label"].argmax(1), logits[len(x):len(x) + len(u)],
                     logits[len(x) + len(u):])["total"].backward()
            d_opt.step()
            d_net.requires_grad_(False)
            g_opt.zero_grad(set_to_none=True)
            fakes = g_net(torch.randn(len(u), latent))
            with torch.no_grad():
                target = d_net.pooled_features(u)
            matching(target, d_net.pooled_features(fakes)).backward()
            g_opt.step()
            d_net.requires_grad_(True)
            with torch.no_grad():
                for e, m in zip(ema.parameters(), d_net.parameters(), strict=True):
                    e.mul_(1 - momentum).add_(m, alpha=momentum)

    plain_s, engine_s = timed_pair(plain, one_more_epoch(trainer), args.repeats)
    print(f"ssl_gan    plain PyTorch loop : {n / plain_s:8.1f} labeled images/s (+ as many unlabeled and generated)")
    print(f"ssl_gan    bundle trainer     : {n / engine_s:8.1f} labeled images/s   engine/plain = "
          f"{plain_s / engine_s:.3f}")
    return {**pair_figures(n, plain_s, engine_s), "image_size": size}


_LOSS_RUN = """
import json, sys, time, torch
from monai.losses import ContrastiveLoss
from monai_cxr_ssl.losses import NTXentLoss


def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))


batch, dim, tau, repeats, name = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
loss = NTXentLoss(temperature=tau, gather=False) if name == "ntxent" else ContrastiveLoss(temperature=tau)
g = torch.Generator().manual_seed(0)
z1, z2 = (torch.randn(batch, dim, generator=g).requires_grad_() for _ in range(2))
open("/proc/self/clear_refs", "w").write("5")  # Linux: the peak resident size starts again from now
before = kib("VmRSS:")
times = []
for _ in range(repeats):
    start = time.perf_counter()
    value = loss(z1, z2)
    value.backward()
    times.append(time.perf_counter() - start)
peak = kib("VmHWM:") - before
print(json.dumps({"loss": float(value.detach()), "ms": 1000 * sorted(times)[len(times) // 2], "peak_mb": peak / 1024}))
"""


def bench_contrastive_loss(args: argparse.Namespace, batch: int = 256, dim: int = 128, tau: float = 0.1) -> dict:
    import json
    import subprocess
    import sys

    figures = {}
    for name in ("ntxent", "monai_contrastive"):
        done = subprocess.run([sys.executable, "-c", _LOSS_RUN, str(batch), str(dim), str(tau), str(args.repeats),
                               name], capture_output=True, text=True, check=True)
        figures[name] = json.loads(done.stdout)
        print(f"loss       {name:<19} : {figures[name]['ms']:8.1f} ms forward+backward, peak "
              f"{figures[name]['peak_mb']:.1f} MB, loss {figures[name]['loss']:.6f} (batch {batch}, τ {tau})")
    return {"batch": batch, "dim": dim, "temperature": tau,
            **{f"{name}_{key}": round(value, 6 if key == "loss" else 1) for name, values in figures.items()
               for key, value in values.items()},
            "monai_over_ntxent_time": round(figures["monai_contrastive"]["ms"] / figures["ntxent"]["ms"], 2)}


def bench_data(args: argparse.Namespace, train_rate: float) -> dict:
    files = sorted(KERMANY.glob("train/*/*.jpeg"))[: args.data_images]
    if not files:
        print(f"data       skipped: {KERMANY} is absent")
        return {}
    figures = {}
    transform = bundle_parser(args, "train.json").get_parsed_content("train#preprocessing")
    items = [{"image": str(f), "label": [0.0]} for f in files]
    for workers in sorted({0, args.workers}):
        loader = DataLoader(Dataset(items, transform), batch_size=args.batch_size, num_workers=workers)
        start = time.perf_counter()
        for _ in loader:
            pass
        rate = len(items) / (time.perf_counter() - start)
        print(
            f"data       {workers} worker(s)        : {rate:8.1f} images/s (Kermany JPEG decode+resize+augment)"
            f"   data/training = {rate / train_rate:.1f}"
        )
        figures[f"{workers}_workers_images_per_s"] = round(rate, 1)
    return figures


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--image-size", type=int, default=64)
    cli.add_argument("--crop-size", type=int, default=56)
    cli.add_argument("--batch-size", type=int, default=16)
    cli.add_argument("--iterations", type=int, default=20, help="batches per timed epoch")
    cli.add_argument("--repeats", type=int, default=5)
    cli.add_argument("--data-images", type=int, default=1000)
    cli.add_argument("--workers", type=int, default=2)
    cli.add_argument("--threads", type=int, default=torch.get_num_threads())
    cli.add_argument("--only", nargs="*", default=None, metavar="PART",
                     help="run these parts only (training, ten-crop, mean-teacher, simclr, s2mts2, ssl-gan, "
                     "contrastive-loss), keeping the other figures of bench/results/throughput.json")
    args = cli.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, image {args.image_size}, crop {args.crop_size}, "
          f"batch {args.batch_size}")
    benches = {"training": bench_training, "ten-crop": bench_tta, "mean-teacher": bench_mean_teacher,
               "simclr": bench_simclr, "s2mts2": bench_s2mts2, "ssl-gan": bench_ssl_gan,
               "contrastive-loss": bench_contrastive_loss}
    if args.only:  # the other figures stay as the last full run wrote them
        import json

        figures = json.loads((REPO / "bench" / "results" / "throughput.json").read_text())["figures"]
        figures.update({name: benches[name](args) for name in args.only})
    else:
        figures = {name: bench(args) for name, bench in benches.items()}
        data = bench_data(args, figures["training"]["engine_images_per_s"])
        if data:
            figures["data"] = data
    write_results(__file__, figures, vars(args))


if __name__ == "__main__":
    main()
