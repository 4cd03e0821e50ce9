"""Run a bundle stage on several processes with torchrun's elastic agent (``torch.distributed.launcher``), as
``torchrun --standalone`` (one machine) or ``torchrun --nnodes M --node-rank r --rdzv-endpoint host:port``
(several) would, from the CLI's ``--nproc-per-node`` and the pipeline.

The launching process keeps what the CLI does in one process (checking the settings before any work, the output
folder's lock, the pipeline's markers and MLflow parent run); each worker runs the stage's configs plus the bundle's
``multi_gpu.json`` (``python -m monai_cxr_ssl.launch``). When a worker dies the agent stops the others and the
launch fails naming the rank; workers stop when their launcher is killed (``distributed.init_process_group``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai_cxr_ssl import locking
from monai_cxr_ssl.settings import check_override_keys, check_settings
from monai_cxr_ssl.workflow import DEFAULT_BUNDLE, make_workflow, resolve_configs, run_workflow

if TYPE_CHECKING:
    from monai.bundle import ConfigWorkflow

__all__ = ["Launch", "StageFailed", "launch_workflow", "main", "multi_gpu_config", "run_bundle"]

MULTI_GPU = "multi_gpu.json"


class StageFailed(RuntimeError):
    """A worker of a launched stage failed; the message names its rank and what it reported."""


@dataclass(frozen=True)
class Launch:
    """How many processes run a stage, as torchrun's options.

    Args:
        nproc_per_node: processes on this machine (one per GPU; on CPUs, gloo processes).
        nnodes: machines taking part; each runs the same command with its own ``node_rank``.
        node_rank: this machine's index, 0 .. nnodes − 1 (0 hosts the rendezvous).
        rdzv_endpoint: ``host:port`` of machine 0, required with several machines.
        rdzv_id: the job's id, the same on every machine (default: from the stage folder).
    """

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.nproc_per_node, int) or self.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node must be a whole number >= 1 (processes per machine), got "
                             f"{self.nproc_per_node!r}.")
        if not isinstance(self.nnodes, int) or self.nnodes < 1:
            raise ValueError(f"--nnodes must be a whole number >= 1, got {self.nnodes!r}.")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in 0..{self.nnodes - 1} (--nnodes {self.nnodes}), got "
                             f"{self.node_rank}.")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("several machines (--nnodes > 1) need --rdzv-endpoint host:port of machine 0.")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def multi_gpu_config(bundle: str | os.PathLike) -> str:
    """The bundle's ``multi_gpu.json``, the overlay every launched stage adds last."""
    return str(Path(bundle).resolve() / "configs" / MULTI_GPU)


def omp_num_threads(processes: int) -> str:
    """``OMP_NUM_THREADS`` for each of ``processes`` sharing this machine: as set, else CPUs / processes (at least
    1); torch otherwise gives every process all the cores and their threads spin against each other."""
    return os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))


def _config(launch: Launch, run_id: str) -> Any:
    from torch.distributed.launcher.api import LaunchConfig

    if launch.nnodes == 1 and not launch.rdzv_endpoint:  # torchrun --standalone
        backend, endpoint, rdzv = "c10d", "localhost:0", {}
    else:  # torchrun --nnodes M --node-rank r --rdzv-endpoint host:port (its static rendezvous)
        backend, endpoint, rdzv = "static", launch.rdzv_endpoint, {"rank": launch.node_rank}
    return LaunchConfig(
        min_nodes=launch.nnodes, max_nodes=launch.nnodes, nproc_per_node=launch.nproc_per_node,
        run_id=launch.rdzv_id or run_id, rdzv_backend=backend, rdzv_endpoint=endpoint, rdzv_configs=rdzv,
        max_restarts=0, monitor_interval=0.5, start_method="spawn",
    )


def launch_workflow(
    configs: Sequence[str], bundle: str | os.PathLike, overrides: dict[str, Any], launch: Launch
) -> None:
    """Run the stage ``configs`` (+ ``multi_gpu.json``) with ``overrides`` on ``launch``'s processes; returns when
    every worker has finished, raises ``StageFailed`` naming the rank when one fails.

    The output folder's lock, held by this process, is lent to the workers (``locking.LAUNCHER_LOCKS``). Each worker
    gets ``OMP_NUM_THREADS`` = CPUs / processes unless it is set.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    from monai_cxr_ssl.distributed import check_backend

    bundle = Path(bundle).resolve()
    files = [*resolve_configs(bundle, configs), multi_gpu_config(bundle)]
    parser = make_workflow(files, bundle, **overrides).parser
    stage_dir = parser.get_parsed_content("stage_dir")
    check_backend(parser.get_parsed_content("distributed_backend"))  # before any process starts
    if "split" in parser and launch.node_rank == 0:  # made (or checked) here, once, errors in one line
        parser.get_parsed_content("split")
    run_id = hashlib.sha256(str(Path(stage_dir).resolve()).encode()).hexdigest()[:16]
    payload = json.dumps({"configs": files, "bundle": str(bundle), "overrides": overrides}, default=str)
    env = {locking.LAUNCHER_LOCKS: os.pathsep.join(str(p) for p in locking.held_locks()),
           "OMP_NUM_THREADS": omp_num_threads(launch.nproc_per_node)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        elastic_launch(_config(launch, run_id), sys.executable)("-m", "monai_cxr_ssl.launch", payload)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        message = _message(failure).rstrip(".")
        raise StageFailed(f"stage {Path(stage_dir).name}: rank {rank} (pid {failure.pid}) failed: {message}; the "
                          "other ranks were stopped. Run the same command again to resume.") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_bundle(
    configs: Sequence[str], bundle: str | os.PathLike = DEFAULT_BUNDLE, launch: Launch | None = None,
    **overrides: Any
) -> ConfigWorkflow:
    """Make a bundle workflow, check the override keys and every setting (``monai_cxr_ssl.settings``), run it: in
    this process, or with ``launch`` on several (the workflow returned is then this process's, not run)."""
    workflow = make_workflow(configs, bundle, **overrides)
    known = [*configs, multi_gpu_config(bundle)] if launch is not None else configs  # its settings too
    check_override_keys(overrides, [make_workflow(known, bundle).parser.get()], where="the overrides")
    check_settings(workflow.parser)
    if launch is None:
        return run_workflow(workflow)

    # machine 0 holds the output folder for the job (the others' workers write nothing there)
    output_dir = workflow.parser.get_parsed_content("output_dir")
    with locking.output_lock(output_dir) if launch.node_rank == 0 else nullcontext():
        launch_workflow(configs, bundle, overrides, launch)
    return workflow


def _message(failure: Any) -> str:
    """What a failed worker reported: its exception's last line, or the signal that killed it."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {failure.exitcode}"


def _worker(payload: str) -> None:
    """A worker: the stage's configs in this process's rank (``multi_gpu.json`` starts the process group)."""
    spec = json.loads(payload)
    run_workflow(make_workflow(spec["configs"], spec["bundle"], **spec["overrides"]))


def _cause(error: BaseException) -> BaseException:
    """The error behind MONAI's config-evaluation errors: the first bad-input one, else the innermost."""
    while error.__cause__ is not None and not isinstance(error, (ValueError, FileNotFoundError)):
        error = error.__cause__
    return error


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m monai_cxr_ssl.launch <payload>``: one worker of ``launch_workflow``."""
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    argv = sys.argv[1:] if argv is None else list(argv)
    handler = get_error_handler()
    handler.initialize()
    try:
        _worker(argv[0])
    except Exception as err:
        cause = _cause(err)
        handler.record_exception(cause)  # what the launcher reports for this rank
        if isinstance(cause, (ValueError, FileNotFoundError)):  # a bad input: one line
            print(f"rank {os.environ.get('RANK', 0)}: {type(cause).__name__}: {cause}", file=sys.stderr)
            raise SystemExit(1) from None
        raise


if __name__ == "__main__":
    main()
