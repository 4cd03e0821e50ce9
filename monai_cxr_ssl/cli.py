"""The ``monai-cxr-ssl`` command: the demo, synthetic data, and bundle runs with recorded configs."""

from __future__ import annotations

import argparse
import errno
import functools
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_cxr_ssl.launch import Launch, StageFailed
from monai_cxr_ssl.workflow import DEFAULT_BUNDLE, OVERLAYS_DIR

# Only light modules are imported up to here: torch, MONAI, MLflow and pandas are imported by the commands that use
# them, so that --help and `compare` start in well under a second or two (bench/cli_startup.py measures it).


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are JSON when they parse as JSON (numbers, lists, null), else strings."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{pair!r} is not of the form key=value (e.g. labeled_fraction=0.05).")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def _sqlite_uri(path: Path) -> str:
    from monai.utils import path_to_sqlite_uri

    return path_to_sqlite_uri(str(path.resolve()))


def cmd_synthesize(args: argparse.Namespace) -> None:
    from monai_cxr_ssl.data import make_synthetic_dataset

    out = make_synthetic_dataset(
        args.out, n_train=args.n_train, n_test=args.n_test, image_size=args.image_size,
        prevalence=args.prevalence, seed=args.seed,
    )
    print(f"SYNTHETIC chest-X-ray-like dataset (not clinical data) in {out}")


def cmd_run(args: argparse.Namespace) -> None:
    from monai_cxr_ssl.launch import run_bundle

    run_bundle(args.configs, bundle=args.bundle, launch=_launch(args), **parse_overrides(args.set))


def cmd_pipeline(args: argparse.Namespace) -> None:
    from monai_cxr_ssl.pipeline import Pipeline, pipeline_options

    options, overrides = pipeline_options(parse_overrides(args.set))
    Pipeline(args.configs, overrides, bundle=args.bundle, echo=_echo, launch=_launch(args), **options).run()


def cmd_sweep(args: argparse.Namespace) -> None:
    from monai_cxr_ssl.pipeline import pipeline_options, run_sweep

    options, overrides = pipeline_options(parse_overrides(args.set))
    run_sweep(args.configs, overrides, args.lambdas, args.seeds, bundle=args.bundle, echo=_echo,
              launch=_launch(args), **options)


def cmd_method(run: str, args: argparse.Namespace) -> None:
    """A method's own command (``methods.Command``): its ``run`` function, imported now."""
    import importlib

    module, function = run.split(":")
    getattr(importlib.import_module(module), function)(args, parse_overrides(args.set), _echo)


def cmd_compare(args: argparse.Namespace) -> None:
    from monai_cxr_ssl.compare import run_compare

    filters = {key: str(value) for key, value in parse_overrides(args.filter).items()}
    if args.labeled_fraction is not None:
        filters["params.labeled_fraction"] = str(args.labeled_fraction)
    if args.image_size is not None:
        filters["params.image_size"] = str(args.image_size)
    result = run_compare(args.experiments, args.output_dir, filters, args.method, args.roc_lambda,
                         tracking_uri=args.tracking_uri, log_summary=not args.no_summary)
    _echo(f"{result['num_runs']} evaluation run(s); test AUROC, mean ± std over seeds (n = runs):")
    _echo(result["markdown"])
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    _echo(f"written to {Path(args.output_dir).resolve()}: {', '.join(result['files'])}")
    if result["summary_run_id"]:
        _echo(f"logged to the MLflow summary run {result['summary_run_id']}")


def _threshold(text: str) -> float | str:
    if text == "youden":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number in [0, 1] nor 'youden'") from None


def cmd_export(args: argparse.Namespace) -> None:
    from monai_cxr_ssl.export import export_model, output_file

    ood = {} if args.ood_images is None else {"ood_images": args.ood_images}
    output = output_file(args.output)
    meta = export_model(args.path, output, args.threshold, args.configs, parse_overrides(args.set), args.bundle,
                        **ood)
    info = meta["cxr_ssl"]
    thresholds = ", ".join(f"{name} {value:.3f}" for name, value in info["thresholds"].items())
    _echo(f"exported stage {info['stage']} ({info.get('method', 'method not recorded')}) to {output}")
    _echo(f"  input 1x{info['crop_size']}x{info['crop_size']} in [0, 1] after resizing to {info['image_size']}, "
          f"ten crops; output: probabilities of {', '.join(info['classes'])}")
    _echo(f"  thresholds ({info['thresholds_source']}): {thresholds}")
    ood = info.get("ood")
    _echo(f"  out-of-distribution check: Mahalanobis threshold {ood['threshold']:.2f} ({ood['num_train']} training, "
          f"{ood['num_validation']} validation images)" if ood else "  out-of-distribution check: none")


def cmd_demo(args: argparse.Namespace) -> None:
    from monai_cxr_ssl.data import make_synthetic_dataset
    from monai_cxr_ssl.pipeline import Pipeline

    workdir = Path(args.workdir).resolve()
    if args.fresh and workdir.exists():
        shutil.rmtree(workdir)
    data_dir = make_synthetic_dataset(workdir / "data", n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    tracking_uri = args.tracking_uri or _sqlite_uri(workdir / "mlflow.db")
    _echo(f"Demo on a SYNTHETIC chest-X-ray-like dataset (generated, not clinical data): {data_dir}")
    overrides = {
        "dataset_dir": str(data_dir), "output_dir": str(workdir / "pipeline"), "tracking_uri": tracking_uri,
        "seed": args.seed,
    }
    if args.epochs is not None:
        overrides["num_epochs"] = args.epochs
    results = Pipeline(["demo"], overrides, echo=_echo).run()
    auroc = results["auroc"]
    _echo("SYNTHETIC data demo: DenseNet121 teacher → pseudo-labels → student, ten-crop test-time augmentation")
    _echo(f"  test AUROC: teacher {auroc['teacher']:.4f}, intermediate {auroc['intermediate']:.4f}, "
          f"student {auroc['student']:.4f}")
    _echo(f"  outputs: {workdir / 'pipeline'} (results.json, table1.md, one folder per stage)")
    _echo(f"  MLflow store: {tracking_uri}")
    _echo(f"  browse it with: mlflow ui --backend-store-uri {tracking_uri}")


def cmd_bundle_path(args: argparse.Namespace) -> None:
    print(OVERLAYS_DIR if args.overlays else DEFAULT_BUNDLE)


def _echo(line: str) -> None:
    print(line, flush=True)


TRUSTED_CONFIGS = (
    "Security: bundle configs and overlays are programs. Their '$' expressions run Python code, so use only configs "
    "and overlays from a trusted source, as MONAI's documentation warns. Files this tool writes into output folders "
    "(config_executed.json, markers, results) are read as plain values and never evaluated."
)


def _config_arguments(parser: argparse.ArgumentParser, nargs: str, configs_help: str, set_help: str) -> None:
    """The config files, ``--bundle`` and ``--set`` arguments that ``run``, ``pipeline`` and ``sweep`` share."""
    parser.epilog = TRUSTED_CONFIGS
    parser.add_argument("configs", nargs=nargs, help=configs_help)
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="bundle folder (default: %(default)s)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help=set_help)


def _launch_arguments(parser: argparse.ArgumentParser) -> None:
    """torchrun's options, for ``run``, ``pipeline`` and ``sweep`` (docs/distributed.md)."""
    group = parser.add_argument_group("distributed training (torchrun)")
    group.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                       help="run every stage on N processes of this machine with torchrun (one per GPU; gloo "
                       "processes without CUDA); default: one process, no torch.distributed")
    group.add_argument("--nnodes", type=int, default=1, help="machines taking part (default: 1)")
    group.add_argument("--node-rank", type=int, default=0, help="this machine's index (default: 0)")
    group.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                       help="machine 0's address and a free port, with --nnodes > 1")
    group.add_argument("--rdzv-id", default=None, help="the job's id, the same on every machine (default: from "
                       "the stage folder)")


def _launch(args: argparse.Namespace) -> Launch | None:
    if args.nproc_per_node is None:
        if args.nnodes != 1 or args.rdzv_endpoint:
            raise ValueError("--nnodes and --rdzv-endpoint need --nproc-per-node N (processes per machine).")
        return None
    return Launch(args.nproc_per_node, args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_id)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monai-cxr-ssl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the teacher-student pipeline on a generated synthetic dataset (offline)")
    demo.add_argument("--workdir", default=".demo", help="where data, checkpoints, reports and mlflow.db go")
    demo.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in --workdir)")
    demo.add_argument("--epochs", type=int, default=None, help="epochs of every stage (default: configs/demo.json)")
    demo.add_argument("--n-train", type=int, default=400, help="synthetic training images (default: %(default)s)")
    demo.add_argument("--n-test", type=int, default=200, help="synthetic test images (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--fresh", action="store_true", help="delete --workdir first instead of resuming")
    demo.set_defaults(func=cmd_demo)

    bundle_path = sub.add_parser(
        "bundle-path",
        help="print the folder of the installed bundle (or, with --overlays, of the overlays such as demo.json)",
        description="Example: python -m monai.bundle run --bundle_root $(monai-cxr-ssl bundle-path) --config_file "
        "\"['$(monai-cxr-ssl bundle-path)/configs/train.json','$(monai-cxr-ssl bundle-path --overlays)/demo.json']\"",
    )
    bundle_path.add_argument("--overlays", action="store_true", help="print the overlays folder instead")
    bundle_path.set_defaults(func=cmd_bundle_path)

    synth = sub.add_parser("synthesize", help="write the synthetic class-per-folder demo dataset")
    synth.add_argument("--out", required=True)
    synth.add_argument("--n-train", type=int, default=400)
    synth.add_argument("--n-test", type=int, default=200)
    synth.add_argument("--image-size", type=int, default=128)
    synth.add_argument("--prevalence", type=float, default=0.3)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_synthesize)

    run = sub.add_parser(
        "run",
        help="run bundle configs (train, evaluate, inference, overlays) and record the executed config",
        description="Example: monai-cxr-ssl run train kermany cpu_small --set output_dir=runs/k labeled_fraction=0.05",
    )
    _config_arguments(run, "+", "train, evaluate or inference, then overlays (configs/ names, paths)",
                      "config overrides, e.g. num_epochs=5")
    _launch_arguments(run)
    run.set_defaults(func=cmd_run)

    overlays_help = "overlays for every stage (configs/ names or files)"
    from monai_cxr_ssl import methods  # the registered methods and stages (no torch, no MONAI)

    kinds = methods.stage_kinds()
    example = next((kind.name for kind in kinds if kind.epochs), kinds[0].name)
    with_rounds = [name for name in methods.names() if methods.get(name).rounds]
    pretraining = methods.pretraining_names()
    stage_help = (
        f"config overrides for every stage (num_epochs=2) or one kind of stage ({example}:num_epochs=3; kinds: "
        f"{', '.join(kind.name for kind in kinds)}); method=NAME picks the method ({', '.join(methods.names())}; "
        f"default {methods.DEFAULT_METHOD}); rounds=N for N rounds ({', '.join(with_rounds) or 'no method has rounds'})"
        "; pretrain=NAME runs a pre-training stage first whose encoder initialises the teacher ("
        + (", ".join(pretraining) if pretraining else "none registered yet") + ")"
    )
    listing = "Methods (method=NAME): " + "; ".join(
        f"{name}{' (default)' if name == methods.DEFAULT_METHOD else ''}: {methods.get(name).help}"
        for name in methods.names()
    ) + ". Pre-training stages (pretrain=NAME): " + ("; ".join(
        f"{name}: {methods.get_pretraining(name).help}" for name in pretraining) or "none registered yet") + "."
    pipe = sub.add_parser(
        "pipeline",
        help=f"the teacher, then a method ({', '.join(methods.names())}), each model evaluated; resumable, one "
        "MLflow parent run",
        description=f"{listing} Example: monai-cxr-ssl pipeline kermany cpu_small "
        f"--set output_dir=runs/k labeled_fraction=0.05 [method=NAME] [pretrain=NAME]",
    )
    _config_arguments(pipe, "*", overlays_help, stage_help)
    _launch_arguments(pipe)
    pipe.set_defaults(func=cmd_pipeline)

    sweep = sub.add_parser(
        "sweep",
        help="the pipeline for every labeled fraction × seed, then Table I (mean ± std over seeds)",
        description="Example: monai-cxr-ssl sweep kermany cpu_small --lambdas 0.02 0.05 0.1 --seeds 0 1 "
        "--set output_dir=runs/sweep",
    )
    _config_arguments(sweep, "*", overlays_help, stage_help)
    sweep.add_argument("--lambdas", type=float, nargs="+", required=True, help="labeled fractions λ, in (0, 1]")
    sweep.add_argument("--seeds", type=int, nargs="+", default=[0], help="split and training seeds (default: 0)")
    _launch_arguments(sweep)
    sweep.set_defaults(func=cmd_sweep)

    for command in (c for name in methods.names() for c in methods.get(name).commands):
        own = sub.add_parser(command.name, help=command.help, description=command.description)
        _config_arguments(own, "*", overlays_help, stage_help)
        command.arguments(own)
        own.set_defaults(func=functools.partial(cmd_method, command.run))

    compare = sub.add_parser(
        "compare",
        help="Table I (mean ± std over seeds), CSV and plots from an experiment's MLflow runs, logged to a summary run",
        description="Example: monai-cxr-ssl compare kermany_pneumonia --tracking-uri sqlite:///runs/sweep/mlflow.db "
        f"--method {methods.DEFAULT_METHOD} --output-dir runs/compare",
    )
    compare.add_argument("experiments", nargs="+", help="MLflow experiment name(s)")
    compare.add_argument("--tracking-uri", default=None,
                         help="MLflow tracking URI, e.g. sqlite:///$PWD/runs/sweep/mlflow.db (a run's store is "
                              "<output_dir>/mlflow.db; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    compare.add_argument("--output-dir", default="compare", help="where the table and plots go (default: compare)")
    compare.add_argument("--method", choices=methods.names(), help="keep one method's stages (and the teacher's)")
    compare.add_argument("--labeled-fraction", type=float, default=None, help="keep one λ")
    compare.add_argument("--image-size", type=int, default=None, help="keep one image size")
    compare.add_argument("--filter", nargs="*", default=[], metavar="KEY=VALUE",
                         help="more filters on params or tags (params.crop_size=224, tags.team=cxr)")
    compare.add_argument("--roc-lambda", type=float, default=None,
                         help="λ whose runs' ROC curves are overlaid (default: the smallest)")
    compare.add_argument("--no-summary", action="store_true", help="do not log a summary run to MLflow")
    compare.set_defaults(func=cmd_compare)

    export = sub.add_parser(
        "export",
        help="TorchScript of a trained model with the bundle metadata embedded (for MONAI Deploy)",
        description="Example: monai-cxr-ssl export runs/kermany/lambda0.05-seed0 -o model.ts. A pipeline folder "
        "exports its final model (the last trained stage); a stage folder exports that stage's best checkpoint; an "
        "experiment folder without results.json exports its single trained stage.",
    )
    export.add_argument("path", help="pipeline output folder (results.json) or stage folder (config_executed.json)")
    export.add_argument("-o", "--output", default="model.ts",
                        help="TorchScript file to write, or an existing folder to write model.ts in "
                        "(default: model.ts)")
    export.add_argument("--threshold", type=_threshold, default=None,
                        help="decision threshold of every class, or 'youden' (per class, on the stage's "
                        "validation_predictions.npz); default: youden when those predictions exist, else 0.5")
    export.add_argument("--configs", nargs="*", default=None,
                        help="configs the stage was trained with, when it was run by python -m monai.bundle run "
                        "(no config_executed.json); names as for run")
    export.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides the stage was trained with (with --configs)")
    export.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="bundle folder (default: %(default)s)")
    export.add_argument("--ood-images", type=int, default=None, metavar="N",
                        help="at most N images per split part (labeled, validation) for the out-of-distribution "
                        "statistics; 0 exports without the check (default: 100)")
    export.set_defaults(func=cmd_export)
    return parser


def _user_error(error: BaseException) -> BaseException | str | None:
    """The bad-input error (ValueError, missing file, a full disk) behind a failure, unwrapping MONAI's
    config-evaluation errors."""
    cause = error
    while cause is not None:
        if isinstance(cause, (ValueError, FileNotFoundError, StageFailed)):  # StageFailed names the failed rank
            return cause
        cause = cause.__cause__
    while error is not None:  # a full disk shows deep in chained errors (checkpoint savers, MLflow, SQLite)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            where = f" while writing {error.filename}" if error.filename else ""
            return (f"no space left on device{where}; free some space (or use an output_dir on another disk) and "
                    "run the same command again.")
        error = error.__cause__ or error.__context__
    return None


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Exception as e:
        cause = _user_error(e)
        if cause is None:
            raise
        print(f"monai-cxr-ssl: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()
