"""The method registry: the semi-supervised methods and pre-training stages that the pipeline, the comparison,
export, the AALS ablation and the CLI know, each declared in one module of this package.

A ``Method`` names the kinds of stage it runs after the supervised teacher (``StageKind``: the bundle config files
of its named config, the id through which the pipeline tells it which stage's outputs to read, its own epochs
setting, whether it learns from unlabeled images), the steps it runs for a number of rounds (each evaluation step
names its Table I column), how an evaluated stage maps to a column and the columns' order, and its CLI help line.
A ``Pretraining`` is a stage run before the teacher of any method; its checkpoint initialises the teacher's
encoder (the teacher's ``encoder_init``). ``register`` adds either, ``unregister`` takes it away again.

Adding a method: a module here (or anywhere, e.g. a test) that makes its ``StageKind``s and ``Method`` and calls
``register``; its stage's overlay goes into the bundle's ``configs/`` (or is named by an absolute path).

This package imports neither torch nor MONAI: the CLI's help reads it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from monai_cxr_ssl.rules import Rule, whole

__all__ = [
    "Command", "DEFAULT_METHOD", "ENCODER_INIT", "EVALUATE", "LABEL_FREE_CONFIG", "Method", "Pretraining",
    "StageKind", "Step", "TEACHER", "TEACHER_COLUMN", "TEACHER_STAGE", "belongs_to", "column_of", "column_order",
    "composed_column", "columns", "epoch_settings", "evaluation", "get", "get_pretraining", "named_configs", "names",
    "plan", "pretraining_names", "register", "setting_rules", "stage_kind", "stage_kinds", "teacher_steps",
    "unregister", "with_pretraining",
]

DEFAULT_METHOD = "teacher_student"
TEACHER_STAGE = "teacher"  # the stage folder of the supervised teacher every method starts from
TEACHER_COLUMN = "teacher"
LINEAR_PROBE_COLUMN = "linear probe"  # the teacher's column when it is a linear probe (``linear_probe``)
ENCODER_INIT = "encoder_init"  # train.json's id: a checkpoint whose encoder initialises the network
_COMPOSED = " + "  # joins a pre-training and a model in a Table I column (``composed_column``)
LABEL_FREE_CONFIG = "label_free.json"  # the overlay of every stage kind without labels (``StageKind.labels``)
# Named configs of the bundle that are no stage of the pipeline.
_OTHER_CONFIGS = {"inference": ("inference.json",)}


@dataclass(frozen=True)
class Step:
    """One stage of the pipeline: the named bundle config it runs and the stages whose outputs it reads."""

    name: str
    config: str  # a named config (``named_configs``)
    kinds: tuple[str, ...]  # stage kinds (``stage_kinds``) whose ``kind:key=value`` overrides apply, in this order
    stage: str  # the stage folder (and MLflow run-name stem) it writes or evaluates
    inputs: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)  # ids the pipeline sets: the stages it reads from
    column: str | None = None  # the Table I column an evaluation fills


@dataclass(frozen=True)
class StageKind:
    """A kind of pipeline stage: one named config of the bundle and the settings that go with it.

    Attributes:
        name: the kind: the prefix of its overrides (``student:num_epochs=3``), its default stage folder and,
            unless ``config`` says otherwise, the name of its config (``monai-cxr-ssl run student``).
        files: its config files, base config first: names in the bundle's ``configs/`` or absolute paths.
        reads: the id that names the stage whose outputs it reads (``init_stage``), set by the pipeline.
        epochs: its own epochs setting, which a general ``num_epochs`` sets too (``student_epochs``); its default
            is in the kind's overlay.
        unlabeled: it learns from the unlabeled split: the pipeline stops before it when that split is empty.
        config: the name of its config when it is not ``name`` (the teacher runs ``train``).
        rules: the checks of the settings its overlay adds (``monai_cxr_ssl.rules``), applied with the shared ones
            (``settings.RULES``) before any work starts; the epochs setting's is implied.
        labels: it learns from the classes' labels and picks its model on the validation AUROC. A kind without
            (a self-supervised pre-training) runs ``LABEL_FREE_CONFIG`` after its base config: it trains on the
            labeled and unlabeled images without their labels, validates nothing and saves its model after its last
            epoch (``models/model.pt``, the format of every stage's).
        network: the overlays of ``files`` that define its network (and probabilities) when they are not the base
            config's DenseNet121: its evaluation runs them too (the named config ``evaluate_<name>``).
    """

    name: str
    files: tuple[str, ...]
    reads: str | None = None
    epochs: str | None = None
    unlabeled: bool = False
    config: str = ""
    rules: dict[str, Rule] = field(default_factory=dict)
    labels: bool = True
    network: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.config:
            object.__setattr__(self, "config", self.name)

    @property
    def config_files(self) -> list[str]:
        """Its config files as the bundle merges them: ``files``, with ``LABEL_FREE_CONFIG`` after the base config
        for a kind without labels."""
        return list(self.files) if self.labels else [self.files[0], LABEL_FREE_CONFIG, *self.files[1:]]

    @property
    def evaluation_config(self) -> str:
        """The named config that evaluates a model of this kind: ``evaluate``, or ``evaluate_<name>`` for a kind
        with its own ``network``."""
        return f"evaluate_{self.name}" if self.network else "evaluate"

    def step(self, stage: str | None = None, source: str | None = None, **settings: Any) -> Step:
        """A step running this kind in the stage folder ``stage`` (default: the kind's name) on the outputs of the
        stage ``source``; ``settings`` override its config."""
        stage = stage or self.name
        if source is None:
            return Step(stage, self.config, (self.name,), stage, (), dict(settings))
        if self.reads is None:
            raise ValueError(f"stage kind {self.name!r} reads no other stage's outputs (it has no 'reads' id).")
        return Step(stage, self.config, (self.name,), stage, (source,), {self.reads: source, **settings})


TEACHER = StageKind(TEACHER_STAGE, ("train.json",), config="train")
EVALUATE = StageKind("evaluate", ("train.json", "predict.json", "evaluate.json"))


@dataclass(frozen=True)
class Command:
    """A CLI command of a method, beside the pipeline's (``monai-cxr-ssl aals-ablation <configs> --set ...``).

    Attributes:
        name: the command's name.
        help: one line for the CLI's help; ``description`` its longer text (an example).
        arguments: adds the command's own options to its ``argparse`` parser (the configs, ``--set`` and
            ``--bundle`` are every command's).
        run: ``"module:function"``, imported when the command runs (the CLI's help imports neither torch nor
            MONAI) and called with the parsed arguments, the ``--set`` overrides and the CLI's ``echo``.
    """

    name: str
    help: str
    description: str
    arguments: Callable[[Any], None]
    run: str


@dataclass(frozen=True)
class Method:
    """A semi-supervised method: what the pipeline runs after the teacher, and how its results make Table I.

    Attributes:
        name: the pipeline's ``method=`` value and the ``compare --method`` choice.
        help: one line for the CLI's help.
        kinds: the kinds of stage it runs after the teacher.
        steps: its steps after the teacher's for a number of rounds (``StageKind.step`` and ``evaluation``), the
            first reading the teacher's stage ``TEACHER_STAGE``; each evaluation names its Table I column.
        rounds: it takes ``rounds`` > 1.
        column_of: the Table I column of one of its evaluated stages (an MLflow run's ``stage`` param), None for
            another method's stage; default: the columns of the evaluations in ``steps(1)``.
        column_order: a sort key among its columns, None for a column it does not rank (those follow every
            method's columns, by name); default: the order of the evaluations in ``steps(1)``.
        commands: its own CLI commands (``Command``), such as the mean teacher's AALS ablation.
        pretrain: a registered pre-training stage that is part of the method (S²MTS²'s): its plan always starts with
            it, and the method's own columns are not composed with its name (the teacher's is).
        check_split: refuses data the method cannot learn (``ValueError``), given the experiment's split: the
            pipeline calls it before the teacher trains (its stages check again).
    """

    name: str
    help: str
    kinds: tuple[StageKind, ...]
    steps: Callable[[int], list[Step]]
    rounds: bool = False
    column_of: Callable[[str], str | None] | None = None
    column_order: Callable[[str], tuple | None] | None = None
    commands: tuple[Command, ...] = ()
    pretrain: str | None = None
    check_split: Callable[[dict], None] | None = None

    @property
    def needs_unlabeled(self) -> bool:
        """Whether it learns from unlabeled images (with none, the pipeline stops after the teacher)."""
        return any(kind.unlabeled for kind in self.kinds)

    def column_for(self, stage: str) -> str | None:
        """The Table I column of ``stage`` if it is one of this method's evaluated stages, else None."""
        if self.column_of is not None:
            return self.column_of(stage)
        return {s.stage: s.column for s in self.steps(1) if s.column}.get(stage)

    def order_of(self, column: str) -> tuple | None:
        """This method's sort key of ``column``, None if it does not rank it."""
        if self.column_order is not None:
            return self.column_order(column)
        ranked = [s.column for s in self.steps(1) if s.column]
        return (ranked.index(column),) if column in ranked else None


@dataclass(frozen=True)
class Pretraining:
    """A pre-training stage run before the teacher of any method (``pretrain=<name>``); the teacher's encoder
    starts from its checkpoint (``encoder_init``, mapped by ``networks.load_encoder``).

    Attributes:
        kind: the stage it runs; its name is the ``pretrain=`` value and its stage folder.
        help: one line for the CLI's help.
        checkpoint: the checkpoint in its stage folder that initialises the teacher.
    """

    kind: StageKind
    help: str
    checkpoint: str = "models/model.pt"

    @property
    def name(self) -> str:
        return self.kind.name


_METHODS: dict[str, Method] = {}
_PRETRAINING: dict[str, Pretraining] = {}


def _kinds_of(entry: Method | Pretraining) -> tuple[StageKind, ...]:
    return entry.kinds if isinstance(entry, Method) else (entry.kind,)


def register(entry: Method | Pretraining) -> Method | Pretraining:
    """Add a method or a pre-training stage to the registry; returns it. A name already registered, or a stage
    kind (or named config) that differs from a registered one of the same name, is an error."""
    if not isinstance(entry, (Method, Pretraining)):
        raise TypeError(f"register takes a Method or a Pretraining, got {type(entry).__name__}.")
    if entry.name in _METHODS or entry.name in _PRETRAINING:
        raise ValueError(f"{entry.name!r} is registered already; unregister it first or choose another name.")
    known = {kind.name: kind for kind in stage_kinds()}
    configs = named_configs()
    for kind in _kinds_of(entry):
        if kind.name in known and known[kind.name] != kind:
            raise ValueError(f"{entry.name!r}: stage kind {kind.name!r} differs from the registered one "
                             f"({known[kind.name]}); reuse that one or choose another name.")
        if kind.name not in known and kind.config in configs:
            raise ValueError(f"{entry.name!r}: stage kind {kind.name!r} runs the config {kind.config!r}, which is "
                             f"named already ({configs[kind.config]}); choose another name.")
    (_METHODS if isinstance(entry, Method) else _PRETRAINING)[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Take the method or pre-training stage ``name`` out of the registry."""
    if _METHODS.pop(name, None) is None and _PRETRAINING.pop(name, None) is None:
        raise ValueError(f"{name!r} is not registered; registered are {names() + pretraining_names()}.")


def names() -> list[str]:
    """The registered methods, in the order they were registered."""
    return list(_METHODS)


def pretraining_names() -> list[str]:
    """The registered pre-training stages."""
    return list(_PRETRAINING)


def get(name: str | None = None) -> Method:
    """The method ``name`` (default ``DEFAULT_METHOD``); an unknown name raises a ``ValueError`` listing them."""
    name = DEFAULT_METHOD if name is None else name
    if name not in _METHODS:
        raise ValueError(f"method must be one of {names()}, got {name!r}.")
    return _METHODS[name]


def get_pretraining(name: str) -> Pretraining:
    """The pre-training stage ``name``; an unknown name raises a ``ValueError`` listing the registered ones."""
    if name not in _PRETRAINING:
        if not _PRETRAINING:
            raise ValueError(f"pretrain={name!r}: no pre-training stage is registered yet, so there is none to run "
                             "before the teacher; leave pretrain out.")
        raise ValueError(f"pretrain must be one of {pretraining_names()}, got {name!r}.")
    return _PRETRAINING[name]


def stage_kinds() -> list[StageKind]:
    """Every kind of stage: the pre-training stages, the teacher, the methods' kinds, the evaluation."""
    kinds = [p.kind for p in _PRETRAINING.values()] + [TEACHER]
    kinds += [kind for method in _METHODS.values() for kind in method.kinds]
    return list({kind.name: kind for kind in [*kinds, EVALUATE]}.values())


def stage_kind(name: str) -> StageKind:
    """The registered stage kind ``name``."""
    for kind in stage_kinds():
        if kind.name == name:
            return kind
    raise ValueError(f"unknown stage kind {name!r}; the stage kinds are {[k.name for k in stage_kinds()]}.")


def named_configs() -> dict[str, list[str]]:
    """The bundle's named configs (``monai-cxr-ssl run <name>``): name -> config files, base config first."""
    kinds = stage_kinds()
    configs = {kind.config: kind.config_files for kind in kinds}
    configs.update({kind.evaluation_config: [EVALUATE.files[0], *kind.network, *EVALUATE.files[1:]]
                    for kind in kinds if kind.network})
    return {**configs, **{name: list(files) for name, files in _OTHER_CONFIGS.items()}}


def epoch_settings() -> tuple[str, ...]:
    """The per-stage epochs settings (``student_epochs`` ...): a general ``num_epochs`` sets those not given."""
    return tuple(dict.fromkeys(kind.epochs for kind in stage_kinds() if kind.epochs))


def setting_rules() -> dict[str, Rule]:
    """The checks of every registered stage kind's own settings (``StageKind.rules``, its epochs setting)."""
    rules: dict[str, Rule] = {}
    for kind in stage_kinds():
        rules.update(kind.rules)
        if kind.epochs:
            rules[kind.epochs] = whole(1)
    return rules


def evaluation(stage: str, kind: StageKind | str, column: str | None) -> Step:
    """The step that evaluates ``stage`` (a model of ``kind``) on the test split, for the table's ``column``."""
    kind = stage_kind(kind) if isinstance(kind, str) else kind
    # the evaluated model's settings apply too: its evaluation run logs that model's hyperparameters
    return Step(f"{stage}/evaluate", kind.evaluation_config, (kind.name, EVALUATE.name), stage, (stage,),
                column=column)


def teacher_steps() -> list[Step]:
    """The supervised teacher on the labeled split, and its evaluation: how every method starts."""
    return [TEACHER.step(), evaluation(TEACHER_STAGE, TEACHER, TEACHER_COLUMN)]


def composed_column(pretrain: str, column: str) -> str:
    """The Table I column of ``column``'s model in a pipeline that ran the pre-training ``pretrain`` first."""
    return f"{pretrain}{_COMPOSED}{column}"


def with_pretraining(steps: list[Step], pretrain: str | None) -> list[Step]:
    """``steps`` with the pre-training stage ``pretrain`` first, the teacher's encoder initialised from its
    checkpoint (``encoder_init``) and every evaluation's column composed (``simclr + teacher``); ``steps``
    unchanged when ``pretrain`` is None."""
    if pretrain is None:
        return list(steps)
    entry = get_pretraining(pretrain)
    teachers = [i for i, s in enumerate(steps) if s.stage == TEACHER_STAGE and s.config == TEACHER.config]
    if not teachers:
        raise ValueError(f"pretrain={pretrain!r}: these steps have no teacher stage to initialise.")
    first = entry.kind.step()
    checkpoint = f"$os.path.join(@output_dir, {first.stage!r}, {entry.checkpoint!r})"
    steps = list(steps)
    teacher = steps[teachers[0]]
    steps[teachers[0]] = dataclasses.replace(teacher, inputs=(*teacher.inputs, first.stage),
                                             settings={**teacher.settings, ENCODER_INIT: checkpoint})
    steps = [dataclasses.replace(s, column=composed_column(pretrain, s.column)) if s.column else s for s in steps]
    return [first, *steps]


def as_linear_probe(steps: list[Step], pretrain: str | None) -> list[Step]:
    """``steps`` with the teacher's evaluation in the linear probe's column (``simclr linear probe``, or ``linear
    probe`` without pre-training): a teacher with ``linear_probe`` set trains only a head on a frozen encoder."""
    column = f"{pretrain} {LINEAR_PROBE_COLUMN}" if pretrain else LINEAR_PROBE_COLUMN
    return [dataclasses.replace(s, column=column) if s.column and s.stage == TEACHER_STAGE else s for s in steps]


def plan(rounds: int = 1, method: str | None = None, pretrain: str | None = None) -> list[Step]:
    """The steps of ``method`` (``names()``, default ``DEFAULT_METHOD``): the teacher and its evaluation, then the
    method's steps for ``rounds`` rounds, after the pre-training stage ``pretrain`` when one is given."""
    entry = get(method)
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a whole number >= 1, got {rounds!r}.")
    if rounds != 1 and not entry.rounds:
        takes = [m.name for m in _METHODS.values() if m.rounds]
        raise ValueError(f"rounds applies to the {' and '.join(takes)} method{'' if len(takes) == 1 else 's'} "
                         f"only; the {entry.name} method runs once.")
    own = entry.pretrain
    if own is not None and pretrain not in (None, own):
        raise ValueError(f"the {entry.name} method runs its own pre-training {own!r}; drop pretrain={pretrain!r}.")
    steps = with_pretraining([*teacher_steps(), *entry.steps(rounds)], pretrain or own)
    if own is not None:  # the method's own pre-training: its columns name the method already
        columns = {s.name: s.column for s in entry.steps(rounds)}
        steps = [dataclasses.replace(s, column=columns[s.name]) if s.column and s.name in columns else s
                 for s in steps]
    return steps


def columns(rounds: int = 1, method: str | None = None) -> list[str]:
    """The Table I columns of ``method`` run for ``rounds`` rounds (ignored by methods that run once)."""
    entry = get(method)
    return [s.column for s in plan(rounds if entry.rounds else 1, entry.name) if s.column]


def column_of(stage: str) -> str:
    """The Table I column of an evaluated stage: the teacher's, the column the stage's method gives it (the
    teacher-student "student" stage is the paper's "intermediate" model), else the stage's own name."""
    if stage == TEACHER_STAGE:
        return TEACHER_COLUMN
    for method in _METHODS.values():
        column = method.column_for(stage)
        if column is not None:
            return column
    return stage


def belongs_to(method: str, stage: str) -> bool:
    """Whether the evaluated ``stage`` is one of ``method``'s (the teacher is every method's)."""
    return stage == TEACHER_STAGE or get(method).column_for(stage) is not None


def column_order(column: str) -> tuple:
    """Table I's sort key of a column: the teacher, then each method's columns in the order the methods were
    registered (and each orders its own), then other columns by name; a composed column (``simclr + teacher``)
    follows its model's plain one."""
    pretrain, _, model = column.rpartition(_COMPOSED)
    if column == TEACHER_COLUMN or model == TEACHER_COLUMN or column.endswith(LINEAR_PROBE_COLUMN):
        return (0, (), pretrain, column)
    for i, method in enumerate(_METHODS.values(), 1):
        rank = method.order_of(model)
        if rank is not None:
            return (i, rank, pretrain, column)
    return (len(_METHODS) + 1, (), pretrain, column)


# The methods shipped with the package register themselves on import, in this order: Table I's column order.
for _module in ("teacher_student", "mean_teacher", "simclr", "s2mts2", "ssl_gan"):
    importlib.import_module(f"{__name__}.{_module}")
