"""The semi-supervised methods as one resumable command, and sweeps of them over λ and seeds.

``Pipeline`` runs the stages of a registered method (``monai_cxr_ssl.methods``) in order: the teacher and its
evaluation, then the method's stages (for the teacher-student method per round the pseudo-label stage with the
balanced filter, the student and the fine-tuned student; for the mean-teacher method the mean teacher), each model
followed by its evaluation; a registered pre-training stage can run first and initialise the teacher's encoder. Each
stage is an ordinary bundle workflow, the same configs ``python -m monai.bundle run`` takes, and
logs its own MLflow run, nested under one parent run per pipeline (and that under one run per sweep).

Skipping and resuming: a stage's key hashes the config items the stage uses (found by following references from
``initialize``/``run``/``finalize``, leaving out bookkeeping such as the MLflow store or the worker count) and the
outputs of the stages it reads. A stage whose done-marker holds the same key is skipped; one that was interrupted
with the same key resumes (training continues from ``last.pt``); otherwise its folder is cleared and it re-runs,
and the pipeline says why.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from monai_cxr_ssl import methods
from monai_cxr_ssl.config_items import read_ids, used_config, uses
from monai_cxr_ssl.launch import Launch, launch_workflow, multi_gpu_config
from monai_cxr_ssl.locking import output_lock
from monai_cxr_ssl.methods import Step, evaluation, plan, teacher_steps
from monai_cxr_ssl.results import COLUMN_TAG, coverage, format_table1, merge_methods, table1, table1_notes
from monai_cxr_ssl.settings import check_override_keys, check_settings
from monai_cxr_ssl.tracking import TrackedRun, experiment_id, pending_file_of, recorded_run, tracking_client
from monai_cxr_ssl.utils import atomic_write, read_json, write_json
from monai_cxr_ssl.workflow import DEFAULT_BUNDLE, make_workflow, run_workflow

__all__ = [
    "PIPELINE_OPTIONS", "Pipeline", "Step", "evaluation", "pipeline_options", "plan", "run_sweep", "split_overrides",
    "teacher_steps", "used_config",
]

# The pipeline's own options (``Pipeline``'s arguments), which the CLI takes among the ``--set`` pairs.
PIPELINE_OPTIONS = ("method", "rounds", "pretrain")
_KIND_OVERRIDE = re.compile(r"(\w+):(?!:)(.+)")


def pipeline_options(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate the pipeline's options (``PIPELINE_OPTIONS``: ``method=NAME``) from the stages' overrides."""
    options = {k: v for k, v in overrides.items() if k in PIPELINE_OPTIONS}
    return options, {k: v for k, v in overrides.items() if k not in PIPELINE_OPTIONS}


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Separate overrides for every stage (``key``) from those for one kind of stage (``student:key``)."""
    common: dict[str, Any] = {}
    kinds = [kind.name for kind in methods.stage_kinds()]
    per_kind: dict[str, dict[str, Any]] = {kind: {} for kind in kinds}
    for key, value in overrides.items():
        match = _KIND_OVERRIDE.fullmatch(key)
        if match is None:
            common[key] = value
        elif match[1] in per_kind:
            per_kind[match[1]][match[2]] = value
        else:
            raise ValueError(f"override {key!r}: unknown stage {match[1]!r}; stage prefixes are {kinds}.")
    return common, per_kind


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _why(previous: dict, used: dict, inputs: dict[str, str]) -> str:
    """Which settings and inputs differ from a stage's previous run, most specific ids only."""
    old = previous["config"]
    changed = sorted(k for k in old.keys() | used.keys() if old.get(k) != used.get(k))
    changed = [k for k in changed if not any(o.startswith(k + "::") for o in changed)]
    remade = [name for name in inputs if previous["inputs"].get(name) != inputs[name]]
    reasons = []
    if changed:
        reasons.append("settings changed: " + ", ".join(k.replace("::", "#") for k in changed))
    if remade:
        reasons.append("input re-made: " + ", ".join(remade))
    return "; ".join(reasons) or "the stage's config files changed"


def _clear(stage_dir: Path, keep: set[str]) -> None:
    """Empty a stage folder before its stage re-runs (stale checkpoints such as ``last.pt`` must not be resumed),
    keeping the files named in ``keep``: the marker of the evaluation that lives there, so that it can say why it
    re-runs too, and the MLflow run records."""
    if stage_dir.is_dir():
        for path in stage_dir.iterdir():
            if path.name in keep:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _marker(path: Path) -> dict | None:
    return read_json(path, "pipeline marker", "delete it to re-run the stage") if path.is_file() else None


class Pipeline:
    """The teacher, then a registered method's stages (``monai_cxr_ssl.methods``), evaluated after each model,
    resumable.

    Args:
        overlays: config overlays (``configs/`` names or files) applied to every stage.
        overrides: ``key: value`` for every stage, ``"<kind>:key": value`` for one kind of stage (kinds:
            ``methods.stage_kinds()``).
        bundle: the bundle folder.
        parent_run_id: an MLflow run (a sweep's) to nest this pipeline's run under.
        echo: where progress lines go.
        steps: run these steps instead of the method's (the AALS ablation's variants).
        name: the MLflow run-name stem of the pipeline's run (and, with ``steps``, its method tag).
        launch: run each stage on several processes with torchrun (``monai_cxr_ssl.launch``); the skipping, the
            markers and the MLflow parent run stay in this process. None: every stage in this process.
        method: the method (``methods.names()``, default ``methods.DEFAULT_METHOD``).
        rounds: the number of its rounds, where it has rounds.
        pretrain: a pre-training stage (``methods.pretraining_names()``) whose encoder starts the teacher.
    """

    def __init__(
        self,
        overlays: Sequence[str] = (),
        overrides: dict[str, Any] | None = None,
        bundle: str | Path = DEFAULT_BUNDLE,
        parent_run_id: str | None = None,
        echo: Callable[[str], None] = print,
        steps: Sequence[Step] | None = None,
        name: str = "pipeline",
        launch: Launch | None = None,
        method: str | None = None,
        rounds: int = 1,
        pretrain: str | None = None,
    ) -> None:
        self.overlays = list(overlays)
        options, overrides = pipeline_options(dict(overrides or {}))
        if options:
            raise ValueError(f"{', '.join(options)} {'is an option' if len(options) == 1 else 'are options'} of the "
                             "pipeline, not a stage setting: pass Pipeline(..., "
                             f"{', '.join(f'{k}={v!r}' for k, v in options.items())}).")
        self.common, self.per_kind = split_overrides(overrides)
        if "labeled_fraction" in self.common and self.common.get("labeled_per_class") is not None:
            raise ValueError("labeled_fraction and labeled_per_class both size the labeled part; set one (the split "
                             "draws labeled_per_class images of each class instead of a fraction).")
        if "linear_probe" in self.common:  # the teacher's setting: a method's own stages learn their whole network
            self.per_kind[methods.TEACHER.name].setdefault("linear_probe", self.common.pop("linear_probe"))
        self.bundle = bundle
        self.sweep_run_id = parent_run_id
        self.echo = echo
        self.launch = launch
        if launch is not None and launch.nnodes > 1 and not launch.rdzv_id:
            raise ValueError("a pipeline on several machines needs --rdzv-id: the same on every machine and new for "
                             "each job (e.g. $SLURM_JOB_ID); machine 0 tells the others through it which stages run.")
        self.rounds = rounds
        # custom steps (the AALS ablation, benchmarks) are recorded under the pipeline's name as their method
        self.method = (method or methods.DEFAULT_METHOD) if steps is None else name
        self.pretrain = pretrain
        self.steps = methods.with_pretraining(list(steps) if steps is not None else plan(rounds, self.method),
                                              pretrain)
        teacher = {**self.common, **self.per_kind[methods.TEACHER.name]}
        parser = make_workflow([methods.TEACHER.config, *self.overlays], bundle, **teacher).parser
        self._teacher_parser = parser
        if parser.get_parsed_content("linear_probe"):
            self.steps = methods.as_linear_probe(self.steps, pretrain)
        self.output_dir = Path(parser.get_parsed_content("output_dir"))
        self.split_file = Path(parser.get_parsed_content("split_file"))
        self.labeled_fraction = parser.get_parsed_content("labeled_fraction")
        self.labeled_per_class = parser.get_parsed_content("labeled_per_class")  # replaces the fraction when set
        self.seed = parser.get_parsed_content("seed")
        self.tracking_uri = parser.get_parsed_content("tracking_uri")
        self.experiment_name = parser.get_parsed_content("experiment_name")
        self.run_name = name + parser.get_parsed_content("run_suffix")
        self.check()

    def check(self) -> None:
        """Check every override key and every stage's settings now, before the first stage trains: a typo or a κ
        out of range stops the pipeline at once, naming the setting, instead of after the teacher."""
        parsers = [make_workflow([step.config, *self.overlays], self.bundle, **self._overrides(step)).parser
                   for step in self.steps]
        launched = [multi_gpu_config(self.bundle)] if self.launch is not None else []  # its settings are known
        plain = {step.config: make_workflow([step.config, *self.overlays, *launched], self.bundle).parser.get()
                 for step in self.steps}  # the stages' configs without the overrides, whose keys are checked
        # a registered method's own setting (its epochs) is known even where this method has no such stage
        check_override_keys(self.common, plain.values(), extra=methods.setting_rules(),
                            where="the overrides of every stage")
        read = [(step, read_ids(parser)) for step, parser in zip(self.steps, parsers, strict=True)
                if any(self.per_kind.values())]  # the ids each stage reads, for per-stage overrides
        for kind, values in self.per_kind.items():
            configs = [plain[step.config] for step in self.steps if kind in step.kinds]
            if values and not configs:
                raise ValueError(f"overrides {[f'{kind}:{k}' for k in values]}: the {self.method} pipeline has no "
                                 f"{kind} stage; its stages are {[step.name for step in self.steps]}.")
            check_override_keys(values, configs, where=f"the {kind} stages")
            for key in values:  # a general num_epochs becomes the stage's own epochs setting
                if key != "num_epochs" and not any(uses(ids, key) for step, ids in read if kind in step.kinds):
                    users = sorted({k for step, ids in read for k in step.kinds if k != "evaluate" and uses(ids, key)})
                    raise ValueError(f"override {kind}:{key}: no {kind} stage uses {key}; stages that do: "
                                     f"{users or 'none'}. Set it for those ({users[0] if users else kind}:{key}=...) "
                                     f"or for every stage ({key}=...).")
        for step, parser in zip(self.steps, parsers, strict=True):
            check_settings(parser, where=f"stage {step.name}", config=plain[step.config])

    def _overrides(self, step: Step) -> dict[str, Any]:
        per_kind = {k: v for kind in step.kinds for k, v in self.per_kind[kind].items()}
        return {**self.common, **per_kind, **step.settings, "stage": step.stage}

    def run(self) -> dict:
        """Run (or resume) every step; returns the results (``labeled_fraction``, ``seed``, ``auroc`` per column).

        The output folder is locked for the run: a second pipeline or stage on it is refused while this one runs.
        On several machines machine 0 runs the pipeline and the others follow it (``_follow``).
        """
        if self.launch is not None and self.launch.node_rank > 0:
            return self._follow()
        with output_lock(self.output_dir):
            return self._run()

    @property
    def _orders(self) -> Path | None:
        """Where machine 0 writes, step by step, what the other machines run (several machines only)."""
        if self.launch is None or self.launch.nnodes == 1:
            return None
        return self.output_dir / ".nodes" / re.sub(r"[^\w.-]", "_", self.launch.rdzv_id)

    def _order(self, index: int, order: dict) -> None:
        if self._orders is not None:
            write_json(self._orders / f"{index}.json", order)

    def _follow(self, poll_s: float = 0.5, timeout_s: float = 3600.0) -> dict:
        """A machine other than 0: run each stage machine 0 launches, as it orders in ``_orders`` (the output folder
        is shared, as the stages' inputs must be), and nothing else (no markers, MLflow or results)."""
        for index, step in enumerate(self.steps, 1):
            path = self._orders / f"{index}.json"
            deadline = time.monotonic() + timeout_s
            while not path.is_file():
                if (self._orders / "end.json").is_file():
                    return {}
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path}: machine 0 gave no order for step {step.name} in {timeout_s:.0f} s; "
                                       "is it running the same pipeline with the same --rdzv-id?")
                time.sleep(poll_s)
            order = read_json(path, "pipeline order", "start the pipeline again on every machine")
            if order["run"]:
                self.echo(f"[{index}/{len(self.steps)}] {step.name}: running with machine 0")
                launch_workflow(order["configs"], self.bundle, order["overrides"], self.launch)
        return {}

    def _run(self) -> dict:
        if self._orders is not None:  # an earlier job's orders (its id should be new: --rdzv-id)
            shutil.rmtree(self._orders, ignore_errors=True)
        client = tracking_client(self.tracking_uri)
        experiment = experiment_id(client, self.experiment_name)
        parent = self._parent_run(client, experiment)
        self.echo(f"pipeline {self.run_name}: {len(self.steps)} steps in {self.rounds} round(s) -> {self.output_dir}")
        outputs: dict[str, dict] = {}
        try:
            entry = methods.get(self.method) if self.method in methods.names() else None
            if entry is not None and entry.check_split is not None:  # data it cannot learn: before the teacher
                entry.check_split(self._teacher_parser.get_parsed_content("split"))
            for index, step in enumerate(self.steps, 1):
                if methods.stage_kind(step.kinds[0]).unlabeled and not self._num_unlabeled():
                    self.echo(
                        f"the unlabeled split is empty (labeled_fraction={self.labeled_fraction}): there is nothing "
                        "to learn from without labels, so the pipeline stops after the (fully supervised) teacher."
                    )
                    break
                outputs[step.name] = self._run_step(index, step, outputs, client, parent)
        except BaseException:
            client.set_terminated(parent, "FAILED")
            raise
        finally:
            if self._orders is not None:
                write_json(self._orders / "end.json", {})
        return self._finish(client, parent, outputs)

    def _num_unlabeled(self) -> int:
        split = read_json(self.split_file, "split file", "run the teacher stage first")
        return split["counts"]["unlabeled"]

    def _parent_run(self, client: mlflow.MlflowClient, experiment: str) -> str:
        """The pipeline's MLflow run: the one recorded in ``output_dir`` for this method if the store still has it,
        else a new one (each method run in the folder has its own)."""
        record = self.output_dir / f"pipeline_run-{self._record_name}.json"
        run_id, created = recorded_run(client, experiment, record, self.run_name)
        if created:  # params are immutable in MLflow; λ and seed cannot change for an output_dir (its split)
            client.log_param(run_id, "labeled_fraction", self.labeled_fraction)
            if self.labeled_per_class is not None:
                client.log_param(run_id, "labeled_per_class", self.labeled_per_class)
            client.log_param(run_id, "seed", self.seed)
        client.set_tag(run_id, "method", self.method)
        client.set_tag(run_id, "rounds", str(self.rounds))
        if self.pretrain is not None:
            client.set_tag(run_id, "pretrain", self.pretrain)
        client.set_tag(run_id, "overlays", json.dumps(self.overlays))
        client.set_tag(run_id, "overrides", json.dumps({**self.common, **{
            f"{kind}:{k}": v for kind, values in self.per_kind.items() for k, v in values.items()}}, default=str))
        if self.sweep_run_id:
            client.set_tag(run_id, MLFLOW_PARENT_RUN_ID, self.sweep_run_id)
        return run_id

    def _run_step(
        self, index: int, step: Step, outputs: dict[str, dict], client: mlflow.MlflowClient, parent: str
    ) -> dict:
        label = f"[{index}/{len(self.steps)}] {step.name}"
        evaluates = methods.EVALUATE.name in step.kinds
        workflow = make_workflow([step.config, *self.overlays], self.bundle, **self._overrides(step),
                                 mlflow_parent_run_id=parent)
        parser = workflow.parser
        used = used_config(parser)
        inputs = {name: outputs[name]["output"] for name in step.inputs}
        key = _digest({"config": used, "inputs": inputs})
        stage_dir = Path(parser.get_parsed_content("stage_dir"))
        done_file, started_file = stage_dir / f".{step.config}.done.json", stage_dir / f".{step.config}.started.json"
        done, started = _marker(done_file), _marker(started_file)
        record_file = Path(parser.get_parsed_content("mlflow_run_record"))
        if done is not None and done["key"] == key:
            self.echo(f"{label}: done earlier with the same settings and inputs; skipped")
            self._order(index, {"run": False})
            run = TrackedRun(client, record_file)
            if not run.flush():  # tracking calls it kept while the MLflow store was away
                self.echo(f"{label}: the MLflow store is unreachable; its tracking calls stay in {run.pending_file}")
            try:
                client.set_tag(done["run_id"], MLFLOW_PARENT_RUN_ID, parent)
                if step.column:
                    client.set_tag(done["run_id"], COLUMN_TAG, step.column)
            except mlflow.exceptions.MlflowException:
                self.echo(f"{label}: its MLflow run {done['run_id']} is no longer in the store")
            return done
        resume = done is None and started is not None and started["key"] == key
        if resume:
            self.echo(f"{label}: resuming an interrupted run with the same settings and inputs")
        elif done is not None or started is not None:
            self.echo(f"{label}: re-running ({_why(done or started, used, inputs)})")
        elif not evaluates and stage_dir.exists():
            self.echo(f"{label}: {stage_dir} holds outputs the pipeline did not record; starting the stage over")
        else:
            self.echo(f"{label}: running")
        if not resume and not evaluates:
            # the evaluation's marker, and the MLflow run records: the stage's handler marks a superseded run killed
            evaluate_record = record_file.name.replace("mlflow_run", "mlflow_run_evaluate")
            evaluation = methods.stage_kind(step.kinds[0]).evaluation_config
            _clear(stage_dir, keep={done_file.name.replace(step.config, evaluation), record_file.name,
                                    pending_file_of(record_file).name, evaluate_record,
                                    pending_file_of(evaluate_record).name})
        record = {"key": key, "step": step.name, "config": used, "inputs": inputs}
        write_json(started_file, record)
        # its MLflow handler continues the recorded run if it resumes, else starts one
        if self.launch is None:
            run_workflow(workflow)
        else:
            configs = [step.config, *self.overlays]
            overrides = {**self._overrides(step), "mlflow_parent_run_id": parent}
            self._order(index, {"run": True, "configs": configs, "overrides": overrides})
            launch_workflow(configs, self.bundle, overrides, self.launch)
        record["run_id"] = read_json(record_file, "MLflow run record", "re-run the stage")["run_id"]
        record["output"] = uuid.uuid4().hex  # identifies this result: stages reading it re-run when it is re-made
        if step.column:
            split = parser.get_parsed_content("eval_split")
            metrics = read_json(stage_dir / f"{split}_metrics.json", "evaluation report", "re-run the evaluation")
            record["mean_auroc"] = metrics["mean_auroc"]
            dropped = read_json(self.split_file, "split file", "re-run the teacher stage").get("left_out_classes")
            record["test_classes"] = coverage(metrics, dropped)
            try:  # compare reads the column there: the stage name alone does not tell a pre-trained model's
                client.set_tag(record["run_id"], COLUMN_TAG, step.column)
            except mlflow.exceptions.MlflowException as err:
                self.echo(f"{label}: could not tag its MLflow run with its column {step.column!r} ({err})")
        write_json(done_file, record)
        started_file.unlink()
        return record

    @property
    def _record_name(self) -> str:
        """The name of this pipeline's own records in the output folder (``results-<name>.json``,
        ``pipeline_run-<name>.json``: ``teacher_student``, ``simclr-mean_teacher``): each method keeps its own."""
        name = self.method if self.pretrain is None else f"{self.pretrain}-{self.method}"
        return re.sub(r"[^\w.-]", "_", name)

    def _folder_results(self, results: dict) -> dict:
        """``results`` merged with those of the other methods finished in this output folder (same λ and seed)."""
        others = []
        for path in sorted(self.output_dir.glob("results-*.json")):
            if path.stem != f"results-{self._record_name}":
                other = read_json(path, "pipeline results", "delete it, or re-run that method's pipeline")
                keys = ("labeled_fraction", "labeled_per_class", "seed")
                if [other.get(k) for k in keys] == [results.get(k) for k in keys]:
                    others.append(other)
        return merge_methods([*others, results])

    def _finish(self, client: mlflow.MlflowClient, parent: str, outputs: dict[str, dict]) -> dict:
        """Write this method's ``results-<method>.json``, ``results.json`` (the last finished pipeline's: export
        reads its final stage) and ``table1.md`` (every method finished in the folder), log them and the AUROCs to
        the parent run, print the tables."""
        ran = [step for step in self.steps if step.name in outputs]
        auroc = {step.column: outputs[step.name]["mean_auroc"] for step in ran if step.column}
        results = {
            "labeled_fraction": self.labeled_fraction,
            **({"labeled_per_class": self.labeled_per_class} if self.labeled_per_class is not None else {}),
            "seed": self.seed,
            "rounds": self.rounds,
            "method": self.method,
            **({"pretrain": self.pretrain} if self.pretrain is not None else {}),
            "run_id": parent,
            "auroc": {step.column: auroc.get(step.column) for step in self.steps if step.column},
            "runs": {step.name: outputs[step.name]["run_id"] for step in ran},
            "test_classes": {step.column: outputs[step.name].get("test_classes") for step in ran if step.column},
        }
        site = read_json(self.split_file, "split file", "re-run the teacher stage").get("eval_source")
        if site is not None:  # domain adaptation: Table I names both sources
            results["sources"] = {"labeled": repr(self._teacher_parser.get_parsed_content("datasource")),
                                  "evaluated": site["source"]}
        own = self.output_dir / f"results-{self._record_name}.json"
        write_json(own, results)
        write_json(self.output_dir / "results.json", results)
        folder = self._folder_results(results)
        table = format_table1(table1([results]), table1_notes([results]))
        folder_table = format_table1(table1([folder]), table1_notes([folder]))
        with atomic_write(self.output_dir / "table1.md") as f:
            f.write(folder_table)
        for col, value in auroc.items():
            if value is not None:  # None: no class of the test split has both positives and negatives
                client.log_metric(parent, metric_name("test_auroc_" + col), value)
        for path in (own, self.output_dir / "results.json", self.output_dir / "table1.md"):
            client.log_artifact(parent, str(path))
        client.set_terminated(parent, "FINISHED")
        self.echo(f"\nTable I (test AUROC, ten-crop TTA) for {self.run_name}:\n{table}")
        if len(folder["methods"]) > 1:
            self.echo(f"Table I of {self.output_dir} (methods {', '.join(folder['methods'])}; table1.md):\n"
                      f"{folder_table}")
        return results


def metric_name(text: str) -> str:
    """``text`` as an MLflow metric key: characters MLflow refuses (``=``, ``%``, ...) and spaces become ``_``."""
    return re.sub(r"[^\w\-./:]", "_", text)


def run_sweep(
    overlays: Sequence[str],
    overrides: dict[str, Any],
    labeled_fractions: Sequence[float],
    seeds: Sequence[int] = (0,),
    bundle: str | Path = DEFAULT_BUNDLE,
    echo: Callable[[str], None] = print,
    launch: Launch | None = None,
    **options: Any,
) -> list[dict]:
    """Run the pipeline for every λ × seed, each in ``<output_dir>/lambda<λ>-seed<s>``, under one MLflow sweep run,
    then print and log Table I with mean ± std over seeds (``<output_dir>/table1.md``, ``table1.json``). The
    sweep's folder is locked while it runs; ``launch`` runs the stages on several processes; ``options`` are the
    pipeline's (``method``, ``rounds``, ``pretrain``: ``Pipeline``)."""
    if not labeled_fractions or not seeds:
        raise ValueError("a sweep needs at least one labeled fraction and one seed.")
    common, _ = split_overrides(dict(overrides))
    if common.get("labeled_per_class") is not None:
        raise ValueError("a sweep varies labeled_fraction, which labeled_per_class replaces: every λ would be the "
                         "same split. Run `monai-cxr-ssl pipeline` once per count (and seed) instead.")
    parser = make_workflow([methods.TEACHER.config, *overlays], bundle, **common).parser
    base = Path(parser.get_parsed_content("output_dir"))
    tracking_uri = parser.get_parsed_content("tracking_uri")  # one store for the sweep (by default in its folder)
    pipelines = [  # made first: each checks its settings, so a bad λ stops the sweep before any training
        Pipeline(overlays, {**overrides, "labeled_fraction": fraction, "seed": seed, "tracking_uri": tracking_uri,
                            "output_dir": str(base / f"lambda{fraction}-seed{seed}")}, bundle, echo=echo,
                 launch=launch, **options)
        for fraction in labeled_fractions for seed in seeds
    ]
    if launch is not None and launch.node_rank > 0:  # another machine: each pipeline follows machine 0's
        for pipeline in pipelines:
            pipeline.run()
        return []
    with output_lock(base):  # the sweep's folder; each pipeline locks its own sub-folder too
        client = tracking_client(tracking_uri)
        experiment = experiment_id(client, parser.get_parsed_content("experiment_name"))
        sweep, _ = recorded_run(client, experiment, base / "sweep_run.json", f"sweep-{base.name}")
        client.set_tag(sweep, "labeled_fractions", json.dumps(list(labeled_fractions)))
        client.set_tag(sweep, "seeds", json.dumps(list(seeds)))
        for pipeline in pipelines:
            pipeline.sweep_run_id = sweep
        results = []
        try:
            for pipeline in pipelines:
                results.append(pipeline.run())
        except BaseException:
            client.set_terminated(sweep, "FAILED")
            raise
        rows = table1(results)
        table = format_table1(rows, table1_notes(results))
        write_json(base / "table1.json", {"rows": rows, "results": results})
        with atomic_write(base / "table1.md") as f:
            f.write(table)
        client.log_artifact(sweep, str(base / "table1.md"))
        client.log_artifact(sweep, str(base / "table1.json"))
        client.set_terminated(sweep, "FINISHED")
        echo(f"\nTable I (test AUROC, ten-crop TTA; mean ± std over seeds {list(seeds)}):\n{table}")
        return results
