"""What the distributed tests look at inside torchrun workers (on ``PYTHONPATH`` there, from ``tests/``).

- ``Checksums``: a trainer handler (overlay ``tests/data/ddp_probe.json``) that, after every epoch, all-gathers a
  checksum of the student and of the EMA teacher from every rank; rank 0 appends them to ``<probe_file>.jsonl``. Every
  rank also writes its pid to ``<probe_file>.rank<r>.pid`` when training starts (the test kills one rank).
- ``QueueLog``: a trainer handler (overlay ``tests/data/queue_probe.json``) that keeps, after every step, the S²MTS²
  queue and this rank's key means; each rank saves them to ``<probe_file>.rank<r>.pt``.
- ``GanWeights``: a trainer handler (overlay ``tests/data/gan_probe.json``) that keeps, after every step, checksums of
  the semi-supervised GAN's discriminator and generator; each rank saves them to ``<probe_file>.rank<r>.pt``.
- ``python tests/ddp_probe.py <out>`` under torchrun: NT-Xent case C (``CASE_C``, τ = 0.1; its known answers are in
  docs/distributed.md) split over the ranks, with and without gathered negatives, and the DDP gradients of a linear
  map that makes the embeddings.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

# NT-Xent case C: two views of four images
CASE_C = (
    [[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]],
    [[0.9, 0.1, 0], [0.2, 0.8, 0.1], [0, 0.3, 0.7], [1, 0.5, 1]],
)


def checksum(module: torch.nn.Module) -> list[float]:
    """Sum and sum of squares of every parameter and floating buffer, in float64."""
    values = [t.detach().double().reshape(-1) for t in (*module.parameters(), *module.buffers())
              if t.is_floating_point()]
    flat = torch.cat(values)
    return [float(flat.sum()), float((flat * flat).sum())]


class Checksums:
    def __init__(self, probe_file: str, teacher: torch.nn.Module, student: torch.nn.Module) -> None:
        self.probe_file, self.teacher, self.student = probe_file, teacher, student

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._pid)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._gather)

    def _pid(self, engine: Engine) -> None:
        Path(f"{self.probe_file}.rank{dist.get_rank()}.pid").write_text(str(os.getpid()))

    def _gather(self, engine: Engine) -> None:
        from monai_cxr_ssl.distributed import unwrap

        mine = {"teacher": checksum(self.teacher), "student": checksum(unwrap(self.student))}
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        if dist.get_rank() == 0:
            with open(f"{self.probe_file}.jsonl", "a") as f:
                f.write(json.dumps({"epoch": engine.state.epoch, "ranks": every}) + "\n")


def _case_c(out: str) -> None:
    from monai_cxr_ssl.distributed import data_parallel, destroy_process_group, init_process_group
    from monai_cxr_ssl.losses import NTXentLoss

    init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    z1, z2 = (torch.tensor(v)[rank * 2: rank * 2 + 2] for v in CASE_C)
    # the embeddings made by a linear map, so that DDP averages the gradients of its weight as in training
    net = data_parallel(torch.nn.Linear(3, 3, bias=False))  # DDP, as the bundle's network
    with torch.no_grad():
        net.module.weight.copy_(torch.eye(3))
    loss = NTXentLoss(temperature=0.1)(net(z1), net(z2))
    loss.backward()
    alone = NTXentLoss(temperature=0.1, gather=False)(z1, z2)
    result = {"rank": rank, "world": world, "loss": loss.item(), "without_gathering": alone.item(),
              "weight_grad": net.module.weight.grad.tolist()}
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(result))
    # the product's teardown, with the DDP module still alive as in a stage: freeing it after a plain
    # dist.destroy_process_group() could deadlock (see distributed.destroy_process_group)
    print(f"rank {rank}: wrote its result; leaving the process group", flush=True)
    destroy_process_group()
    print(f"rank {rank}: left the process group", flush=True)


if __name__ == "__main__":
    _case_c(sys.argv[1])


class QueueLog:
    """A trainer handler (overlay ``tests/data/queue_probe.json``) that records, after every iteration, this rank's
    key means of the step and the whole queue with its pointer; every rank saves its list to
    ``<probe_file>.rank<r>.pt`` when training completes."""

    def __init__(self, probe_file: str, loss: torch.nn.Module) -> None:
        self.probe_file, self.loss, self.steps = probe_file, loss, []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record)
        engine.add_event_handler(Events.COMPLETED, self._save)

    def _record(self, engine: Engine) -> None:
        queue = self.loss.queue
        self.steps.append({"means": self.loss.means.detach().cpu().clone(), "keys": queue.keys.detach().cpu().clone(),
                           "pointer": int(queue.pointer), "filled": int(queue.filled)})

    def _save(self, engine: Engine) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save(self.steps, f"{self.probe_file}.rank{rank}.pt")


class GanWeights:
    """A trainer handler (overlay ``tests/data/gan_probe.json``) that records, after every iteration, the checksums
    of the discriminator and the generator (unwrapped: parameters and buffers) and whether each is wrapped in
    ``DistributedDataParallel``; every rank saves its list to ``<probe_file>.rank<r>.pt`` when training completes."""

    def __init__(self, probe_file: str, discriminator: torch.nn.Module, generator: torch.nn.Module) -> None:
        self.probe_file, self.networks, self.steps = probe_file, {"d": discriminator, "g": generator}, []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record)
        engine.add_event_handler(Events.COMPLETED, self._save)

    def _record(self, engine: Engine) -> None:
        from monai_cxr_ssl.distributed import unwrap

        self.steps.append({
            **{name: checksum(unwrap(net)) for name, net in self.networks.items()},
            "wrapped": [isinstance(net, torch.nn.parallel.DistributedDataParallel) for net in self.networks.values()],
        })

    def _save(self, engine: Engine) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save(self.steps, f"{self.probe_file}.rank{rank}.pt")
