"""The ``cass`` command line: thin wrappers over the stage functions.

Every command reads ``params.yaml`` (``--params``) and accepts ``--set section.key=value`` overrides,
validated exactly like the file. Errors print one clear message and exit non-zero.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cass.errors import CassError, GateFailed

log = logging.getLogger("cass")

EPILOG = """examples:
  cass demo                                  # generate the demo data and run every stage on CPU
  cass data prepare --set split.seed=1       # manifest, splits and label-fraction subsets
  cass pretrain --set pretrain.epochs=3      # CASS pretraining of the CNN and the ViT
  cass finetune --network both               # fine-tune both at finetune.label_fraction
  cass evaluate --network cnn                # test metrics, confusion matrix, ROC curves
  cass tune --network cnn --workers 2        # Optuna search; then cass finetune --best-params FILE
  cass promote --network cnn --version 3     # move 'champion' to v3 if it passes the gate and beats it
  cass predict --model models:/cass-demo-cnn@champion img1.png img2.png
  cass explain --model models:/cass-demo-vit@champion img1.png   # heat maps of what it looks at
  cass validate manifest                     # data-quality gate before training (also: splits, model)
"""


def _common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("settings")
    g.add_argument("--params", default="params.yaml", metavar="FILE", help="settings file (default: %(default)s)")
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set pretrain.epochs=3 (repeatable; value read as YAML)",
    )
    g.add_argument(
        "--outputs", default="outputs", metavar="DIR", help="root of the stage outputs (default: %(default)s)"
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings and errors only")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cass",
        description="CASS: Cross-Architectural Self-Supervision for medical image classification. A CNN and "
        "a ViT are pretrained together without labels, then each is fine-tuned with few labels.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser(
        "data",
        help="dataset commands: demo, prepare, show; versioning: add, remote, push, pull, verify",
        description="Generate the demo dataset, build the manifest, show class counts; version datasets "
        "with DVC (data.dvc) and move them to and from an S3 remote. See docs/dvc.md.",
    )
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    p = dsub.add_parser(
        "demo",
        help="generate the embedded demo dataset at data.root",
        description="Write the synthetic tissue-patch dataset (4 classes) as an ImageFolder tree.",
    )
    p.add_argument("--out", metavar="DIR", help="target folder (default: data.root)")
    p.add_argument("--force", action="store_true", help="regenerate even if it is already there")
    _common(p)
    p = dsub.add_parser(
        "prepare",
        help="manifest, splits and label-fraction subsets",
        description="Read the dataset (data.layout), hash and decode every image, assign "
        "stratified seeded splits and write label-fraction subsets to <outputs>/data.",
    )
    _common(p)
    p = dsub.add_parser(
        "show",
        help="class counts per split of the prepared data",
        description="Print the classes, split sizes and data version of <outputs>/data.",
    )
    _common(p)
    _data_versioning_parsers(dsub)

    p = sub.add_parser(
        "pretrain",
        help="CASS self-supervised pretraining of the CNN and the ViT",
        description="Train both networks on every unlabelled training image with the CASS loss. "
        "Checkpoints each epoch to <outputs>/pretrain and resumes after an interruption. "
        "--method dino pretrains each network with the DINO baseline instead, into the same files.",
    )
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start over")
    _nproc(p)
    p.add_argument(
        "--method", choices=["cass", "dino"], help="pretraining method (default: pretrain.method from the settings)"
    )
    _common(p)

    p = sub.add_parser(
        "finetune",
        help="fine-tune the CNN and/or the ViT at a label fraction",
        description="Supervised fine-tuning with focal loss on the finetune.label_fraction subset, "
        "early stopping on validation loss; writes <outputs>/finetune/<network>.",
    )
    p.add_argument(
        "--network",
        choices=["cnn", "vit", "both"],
        default="both",
        help="which network (default: %(default)s = finetune.networks)",
    )
    p.add_argument(
        "--best-params",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="a best_<network>.yaml from `cass tune`: its finetune settings replace params.yaml's for that "
        "network (repeatable, one file per network)",
    )
    _nproc(p)
    _common(p)

    p = sub.add_parser(
        "tune",
        help="search fine-tuning settings with Optuna (one process, local workers or many machines)",
        description="An Optuna study per network over the tune.space settings: seeded TPE sampler, pruning on "
        "per-epoch validation reports, tune.objective as the target. Writes <outputs>/tune/best_<network>.yaml "
        "for `cass finetune --best-params`. Trials are stored in a SQLite file under <outputs>/tune unless "
        "--storage (or $CASS_TUNE_STORAGE) names a database that several workers share, e.g. PostgreSQL.",
    )
    p.add_argument(
        "--network",
        choices=["cnn", "vit", "both"],
        default="both",
        help="which network (default: %(default)s = finetune.networks)",
    )
    p.add_argument("--workers", type=int, default=1, metavar="N", help="local worker processes (default: 1)")
    p.add_argument(
        "--worker",
        action="store_true",
        help="only run trials of the shared study (another machine or pod); the main `cass tune` writes the result",
    )
    p.add_argument(
        "--worker-index",
        type=int,
        metavar="I",
        help="with --worker: sampler seed offset, one per worker, from 1 (the main command's workers use 0..N-1)",
    )
    p.add_argument(
        "--storage", metavar="URL", help="sqlite:///FILE or postgresql://USER@HOST/DB (default: tune.storage)"
    )
    p.add_argument("--study", metavar="NAME", help="study name prefix (default: tune.study_name)")
    p.add_argument(
        "--n-trials", type=int, metavar="N", help="finished trials over all workers (default: tune.n_trials)"
    )
    p.add_argument(
        "--timeout", type=float, metavar="S", help="seconds after which no trial starts (default: tune.timeout)"
    )
    _common(p)

    p = sub.add_parser(
        "evaluate",
        help="test metrics of fine-tuned networks",
        description="Macro F1, balanced accuracy, per-class scores, AUROC, confusion matrix and "
        "ROC curves on the test split; writes <outputs>/evaluate/<network>.",
    )
    p.add_argument(
        "--network",
        choices=["cnn", "vit", "both"],
        default="both",
        help="which network (default: %(default)s = finetune.networks)",
    )
    _common(p)

    p = sub.add_parser(
        "validate",
        help="data-quality and model gates (Great Expectations): manifest, splits, model",
        description="Run a gate: 'manifest' before any training (files exist, stay inside the data root, "
        "decode; sizes, modes, labels, class counts), 'splits' before fine-tuning (no image or patient in two "
        "splits, every class in every split, subsets inside train), 'model' before registration (metrics "
        "present, in [0, 1], above the floors, no class with zero recall). Thresholds and severities: the "
        "quality: section of params.yaml. Writes Data Docs HTML and result.json to <outputs>/quality/<gate>; "
        f"exits {GateFailed.exit_code} when a check of severity 'fail' failed.",
    )
    p.add_argument("gate", choices=["manifest", "splits", "model"], help="which gate")
    p.add_argument(
        "--network",
        choices=["cnn", "vit", "both"],
        default="both",
        help="model gate: which network's <outputs>/evaluate/<network>/metrics.json (default: %(default)s)",
    )
    p.add_argument("--metrics", metavar="FILE", help="model gate: a metrics.json to check instead")
    p.add_argument("--report", metavar="DIR", help="report folder (default: <outputs>/quality/<gate>)")
    _common(p)

    p = sub.add_parser(
        "demo",
        help="run the retraining flow end to end on the embedded demo dataset",
        description="Run the Prefect retraining flow (flows/retrain.py) on the demo dataset: generate it if "
        "needed, prepare, check the data gates, pretrain, fine-tune and evaluate both networks, check the "
        "model gate, register both networks and promote each to 'champion' when it beats the current champion. "
        "Runs are logged to MLflow (the local store sqlite:///mlflow.db + mlruns/ unless MLFLOW_TRACKING_URI is "
        "set); the flow runs against the Prefect server at PREFECT_API_URL, or a temporary local one whose "
        "history stays in .prefect/ (PREFECT_HOME). A rerun with nothing changed trains nothing (--force "
        "retrains). See docs/prefect.md.",
    )
    p.add_argument("--tune-trials", type=int, default=0, metavar="N",
                   help="tune each network with N Optuna trials of tune.epochs epochs before fine-tuning; the demo "
                   "skips tuning (default: %(default)s): on its tiny ViT a few short trials cannot tell settings apart")
    p.add_argument("--force", action="store_true", help="retrain even when nothing changed since the last run")
    p.add_argument("--no-flow", action="store_true",
                   help="run the tracked pipeline in this process, without Prefect and without tuning")
    p.add_argument("--no-mlflow", action="store_true", help="run the stages without Prefect, tracking or registry")
    p.add_argument("--no-promote", action="store_true",
                   help="register the models but leave the champion alone (implies --no-flow)")
    _common(p)

    p = sub.add_parser(
        "register",
        help="log fine-tuned models on disk to MLflow and register them",
        description="Log <outputs>/finetune/<network> (with its evaluation in <outputs>/evaluate/<network>) "
        "as an MLflow model and register it as <mlflow.model_prefix>-<network>. `cass demo` does this itself.",
    )
    p.add_argument("--network", choices=["cnn", "vit", "both"], default="both", help="(default: %(default)s)")
    _common(p)

    p = sub.add_parser(
        "promote",
        help="move the 'champion' alias to a registered version, behind the gate",
        description="Promote when the model gate passes and the version beats the champion on the same test "
        "set by mlflow.promotion_margin in mlflow.promotion_metric. The decision is recorded as version tags. "
        "Exit status 0: promoted; 1: refused (the champion stays).",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--network", choices=["cnn", "vit"], help="the model <mlflow.model_prefix>-<network>")
    target.add_argument("--model", metavar="NAME", help="a registered model name")
    p.add_argument("--version", help="the version to promote (default: the latest)")
    p.add_argument("--force", action="store_true", help="skip the gate and the comparison (needs --reason)")
    p.add_argument("--reason", metavar="TEXT", help="why; recorded on the version (required with --force)")
    _common(p)

    p = sub.add_parser(
        "rollback",
        help="move 'champion' back to the previous champion",
        description="Restore the version recorded as previous_champion on the current champion.",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--network", choices=["cnn", "vit"], help="the model <mlflow.model_prefix>-<network>")
    target.add_argument("--model", metavar="NAME", help="a registered model name")
    p.add_argument("--reason", metavar="TEXT", required=True, help="why; recorded on both versions")
    _common(p)

    p = sub.add_parser(
        "predict",
        help="class probabilities of image files from a registered model",
        description="Load an MLflow model (e.g. models:/cass-demo-cnn@champion) and print, or write as CSV, "
        "each image's most probable class and per-class probabilities.",
    )
    p.add_argument("--model", required=True, metavar="URI", help="models:/<name>@champion, models:/<name>/<version>, "
                   "runs:/<run>/model, ...")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (PNG, JPEG, TIFF, ...)")
    p.add_argument("--output", type=Path, metavar="FILE", help="write a CSV here instead of printing")
    _common(p)

    # -- issue 16: heat maps of any image from a registered model (cass.explain) --
    p = sub.add_parser(
        "explain",
        help="heat maps of what a registered model looks at, for any images",
        description="Load an MLflow model (e.g. models:/cass-demo-cnn@champion) or a fine-tuning folder and "
        "write, per image, the image beside its heat map for the predicted class (CNN: Grad-CAM; ViT: "
        "evaluate.vit_explainer) with the predicted label and probability, as <out>/<image>.<network>.png.",
    )
    p.add_argument("--model", required=True, metavar="URI", help="models:/<name>@champion, models:/<name>/<version>, "
                   "runs:/<run>/model, or a folder such as outputs/finetune/cnn")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (PNG, JPEG, TIFF, ...)")
    p.add_argument("--out", type=Path, default=Path("explanations"), metavar="DIR",
                   help="folder for the overlays (default: %(default)s)")
    _common(p)

    p = sub.add_parser(
        "models",
        help="list timm model names usable as model.cnn / model.vit",
        description="List the timm model names the factory accepts.",
    )
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'resnet*' (default: all)")
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = (
        logging.DEBUG
        if getattr(args, "verbose", False)
        else (logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    )
    fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: rank 0 speaks, the others only on errors
        fmt = f"%(asctime)s [rank {os.environ.get('RANK', '?')}] %(levelname)-7s %(name)s: %(message)s"
        if os.environ.get("RANK", "0") != "0":
            level = max(level, logging.ERROR)
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stderr)


def _nproc(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train data-parallel in N processes on this machine (one per GPU), re-launched under "
        "`torchrun --standalone --nproc_per_node N`; batch_size stays the global batch (default: %(default)s)",
    )


DISTRIBUTED_COMMANDS = ("pretrain", "finetune")


def _distributed_launch(args: argparse.Namespace) -> int | None:
    """Re-run this command under torchrun for ``--nproc N``; refuse commands that cannot run in several
    processes. None: go on in this process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.command not in DISTRIBUTED_COMMANDS:
        raise CassError(f"`cass {args.command}` runs in one process; only {' and '.join(DISTRIBUTED_COMMANDS)} "
                        f"run under torchrun (WORLD_SIZE={world})")
    nproc = getattr(args, "nproc", 1)
    if nproc < 1:
        raise CassError(f"--nproc {nproc}: give a number of processes >= 1")
    if nproc > 1 and "RANK" not in os.environ:
        from cass.distributed import launch

        return launch(nproc, args.argv)
    return None


def _networks(args: argparse.Namespace, params) -> tuple[str, ...]:
    return tuple(params.finetune.networks) if args.network == "both" else (args.network,)


def _data_versioning_parsers(dsub) -> None:
    """`cass data add|remote|push|pull|verify`: DVC around the dataset (cass.versioning)."""
    p = dsub.add_parser(
        "add",
        help="version a dataset with DVC (data.dvc) and point params.yaml at it",
        description="Track PATH in data.dvc and set data.name, data.root and data.layout in params.yaml, so "
        "`dvc repro` builds from it. A folder outside the project is copied (or moved, --move) to "
        "data/<name>; one inside is tracked where it is. --set data.KEY=VALUE settings (e.g. data.csv.file) "
        "are written to params.yaml with it. Then commit data.dvc, data/.gitignore and params.yaml.",
    )
    p.add_argument("path", type=Path, help="the dataset folder")
    p.add_argument("--layout", required=True, choices=["imagefolder", "csv", "medmnist"], help="how it is organised")
    p.add_argument("--name", help="dataset name, also the folder data/<name> (default: the folder's name)")
    p.add_argument("--move", action="store_true", help="move a folder from outside the project instead of copying")
    _common(p)
    p = dsub.add_parser(
        "remote",
        help="configure (URL given) or show the S3 remote that push and pull use",
        description="Make s3://BUCKET/PATH the default DVC remote. MinIO and other S3-compatible stores: "
        "--endpoint-url. Credentials are never stored by this command: set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (or ~/.aws), or `dvc remote modify --local NAME access_key_id ...`.",
    )
    p.add_argument("url", nargs="?", help="s3://BUCKET/PATH; without it, show the configured remote")
    p.add_argument("--name", default="store", help="remote name (default: %(default)s)")
    p.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint, e.g. http://minio:9000 (default: AWS)")
    p.add_argument("--region", help="bucket region")
    p.add_argument("--local", action="store_true", help="write to .dvc/config.local (kept out of git)")
    _common(p)
    for verb, text in (("push", "upload the data and pipeline outputs to"), ("pull", "download them from")):
        p = dsub.add_parser(
            verb,
            help=f"dvc {verb}: {text} the remote, after checking it",
            description=f"`dvc {verb}` ({text} the remote) after checking that a remote is configured and its "
            "endpoint answers (3 tries), and re-hashing the local DVC cache: push refuses corrupted objects, "
            "pull replaces them with the remote's copy.",
        )
        p.add_argument("targets", nargs="*", help="DVC files or stages (default: everything)")
        p.add_argument("-r", "--remote", help="remote name (default: the default remote)")
        p.add_argument("-j", "--jobs", type=int, help="parallel transfers")
        p.add_argument("--no-verify", action="store_true", help="skip re-hashing the local cache (large datasets)")
        _common(p)
    p = dsub.add_parser(
        "verify",
        help="re-hash the DVC cache objects of data.dvc and dvc.lock",
        description="DVC trusts a cache file whose size and mtime did not change; this re-hashes every object "
        "the project refers to and lists those whose content does not match their md5.",
    )
    p.add_argument("--remove", action="store_true", help="delete corrupted objects (then `cass data pull`)")
    _common(p)


def _run_data_versioning(args: argparse.Namespace) -> int:
    from cass import versioning

    if args.data_command == "add":
        t = versioning.track_dataset(
            args.path, args.layout, name=args.name, move=args.move, params_file=args.params, overrides=args.overrides
        )
        listed = f"{t.images} images, {len(t.classes)} classes" if t.images is not None else f"{t.nfiles} files"
        print(f"tracked {t.path} in {versioning.DATA_DVC}: {listed}, data version {t.md5}")
        print(f"{args.params}: data.root={t.path}, data.layout={args.layout}")
        print(f"next: git add {versioning.DATA_DVC} {Path(t.path).parent.as_posix()}/.gitignore {args.params} && "
              "git commit; cass data push; dvc repro")
    elif args.data_command == "remote":
        r = (
            versioning.configure_remote(
                args.url, name=args.name, endpoint_url=args.endpoint_url, region=args.region, local=args.local
            )
            if args.url
            else versioning.get_remote(versioning.project_root())
        )
        print(f"default DVC remote: {r.describe()}")
    elif args.data_command in ("push", "pull"):
        verb = versioning.push if args.data_command == "push" else versioning.pull
        summary = verb(args.targets, remote=args.remote, jobs=args.jobs, verify=not args.no_verify)
        print(summary or "nothing to transfer")
    else:
        report = versioning.verify_cache(remove=args.remove)
        print(f"{report.checked} cache objects checked, {report.missing} not in the local cache")
        if report.removed:
            print(f"removed {len(report.corrupted)} corrupted object(s); `cass data pull` fetches good copies "
                  "(or `dvc commit --force` where the workspace copy is intact)", file=sys.stderr)
        elif not report.ok:
            print(versioning.corruption_message(report, "corrupted cache"), file=sys.stderr)
            return 1
    return 0


def _print_metrics(results: dict[str, dict]) -> None:
    print(f"\n{'network':8} {'macro F1':>9} {'bal. acc':>9} {'AUROC':>7}  test images")
    for network, m in results.items():
        auroc = m.get("macro_auroc")
        print(
            f"{network:8} {m['macro_f1']:9.3f} {m['balanced_accuracy']:9.3f} "
            f"{auroc if auroc is None else f'{auroc:7.3f}':>7}  {m['num_samples']}"
        )


def _validate(args: argparse.Namespace, params, layout) -> int:
    """Run one gate; print its summary (failures and warnings) and the Data Docs location."""
    from cass.quality import validate_manifest, validate_model, validate_splits

    report = Path(args.report) if args.report else None
    if args.gate == "manifest":
        results = [
            validate_manifest(
                params, layout.data, report or layout.quality("manifest"), cache_path=layout.decode_cache,
                raise_on_failure=False,
            )
        ]
    elif args.gate == "splits":
        results = [validate_splits(params, layout.data, report or layout.quality("splits"), raise_on_failure=False)]
    elif args.metrics:
        target = report or layout.quality("model")
        results = [validate_model(params, Path(args.metrics), target, raise_on_failure=False)]
    else:
        results = [
            validate_model(
                params,
                layout.evaluate(network) / "metrics.json",
                (report or layout.quality("model")) / network,
                raise_on_failure=False,
            )
            for network in _networks(args, params)
        ]
    for result in results:
        print(result.summary(), file=sys.stdout if result.success else sys.stderr)
    return 0 if all(r.success for r in results) else GateFailed.exit_code


def run(args: argparse.Namespace) -> int:
    if args.command == "data" and args.data_command in ("add", "remote", "push", "pull", "verify"):
        return _run_data_versioning(args)  # DVC around the data: no need to import the training stack
    from cass.config import load_params
    from cass.pipeline import Layout

    if args.command == "models":
        import fnmatch

        from cass.models import known_models

        names = [n for n in known_models() if fnmatch.fnmatch(n, args.pattern)]
        print("\n".join(names))
        return 0

    params = load_params(args.params, args.overrides)
    layout = Layout(Path(args.outputs))
    progress = not args.quiet

    if args.command == "data":
        if args.data_command == "demo":
            from cass.data.demo import generate_demo

            out = Path(args.out or params.data.root)
            generate_demo(out, params.data.demo_images_per_class, params.data.demo_image_size, force=args.force)
            print(f"demo dataset at {out}")
        elif args.data_command == "prepare":
            from cass.data.prepare import prepare_data, summarize

            print(summarize(prepare_data(params, layout.data)))
        else:
            from cass.data.prepare import summarize

            print(summarize(layout.data))
        return 0

    if args.command == "pretrain":
        from cass.pretrain import pretrain

        if args.method:
            params = load_params(args.params, [*args.overrides, f"pretrain.method={args.method}"])
        out = pretrain(params, layout.data, layout.pretrain, resume=not args.no_resume, progress=progress)
        if os.environ.get("RANK", "0") != "0":
            return 0  # rank 0 reports
        print(json.dumps(json.loads(out.metrics.read_text()), indent=2))
        print(f"weights: {out.cnn}, {out.vit}")
        return 0

    if args.command == "finetune":
        from cass.finetune import finetune
        from cass.tune import apply_best_params, best_params_by_network

        networks = _networks(args, params)
        best = best_params_by_network(args.best_params, networks)
        pre = layout.pretrain if params.finetune.init == "cass" else None
        for network in networks:
            net_params = apply_best_params(params, best[network], network) if network in best else params
            out = finetune(net_params, layout.data, network, layout.finetune(network), pre, progress=progress)
            if os.environ.get("RANK", "0") != "0":
                continue  # rank 0 reports
            m = json.loads(out.metrics.read_text())
            print(
                f"{network}: best epoch {m['best_epoch']}, val loss {m['best_val_loss']:.4f}, "
                f"val macro F1 {m['best_val_macro_f1']:.3f} -> {out.weights}"
            )
        return 0

    if args.command == "tune":
        from cass.tune import default_worker_index, read_best_params, route_optuna_logging, tune, work

        chosen = {"n_trials": args.n_trials, "timeout": args.timeout, "study_name": args.study}
        extra = [f"tune.{key}={json.dumps(value)}" for key, value in chosen.items() if value is not None]
        if extra:
            params = load_params(args.params, [*args.overrides, *extra])
        route_optuna_logging()
        pre = layout.pretrain if params.finetune.init == "cass" else None
        out_dir = layout.root / "tune"
        for network in _networks(args, params):
            if args.worker:
                index = default_worker_index() if args.worker_index is None else args.worker_index
                work(
                    params,
                    layout.data,
                    network,
                    out_dir,
                    pre,
                    workers=args.workers,
                    storage=args.storage,
                    worker_index=index,
                )
                print(f"{network}: the study has its trials; the main `cass tune` writes the best settings")
                continue
            path = tune(params, layout.data, network, out_dir, pre, workers=args.workers, storage=args.storage)
            doc = read_best_params(path)
            print(
                f"{network}: best trial {doc['trial']} of {doc['study']}, {doc['objective']} {doc['value']:.4f} "
                f"-> {path}"
            )
        return 0

    if args.command == "evaluate":
        from cass.evaluate import evaluate

        results = {}
        for network in _networks(args, params):
            out = evaluate(params, layout.data, layout.finetune(network), layout.evaluate(network))
            results[network] = json.loads(out.metrics.read_text())
        _print_metrics(results)
        return 0

    if args.command == "validate":
        return _validate(args, params, layout)

    if args.command == "demo":
        if not (args.no_mlflow or args.no_flow or args.no_promote):
            return _demo_flow(args, params, layout)
        on_stage = lambda s: log.info("== stage: %s", s)  # noqa: E731
        if args.no_mlflow:
            from cass.pipeline import run_pipeline

            results = run_pipeline(params, layout, progress=progress, on_stage=on_stage)
        else:
            from cass.tracking import tracked_pipeline, tracking_uri

            tracked = tracked_pipeline(params, layout, params_file=Path(args.params), promote=not args.no_promote,
                                       progress=progress, on_stage=on_stage)
            results = tracked.results
        _print_metrics(results)
        print(f"\noutputs under {layout.root}/: confusion matrices and ROC curves in {layout.root}/evaluate/<network>/")
        if not args.no_mlflow:
            from cass.tracking import is_server, redact

            uri = redact(tracking_uri(params.mlflow))
            browse = uri if is_server(uri) else f"`mlflow ui --backend-store-uri {uri}`"
            print(f"MLflow run {tracked.run_id} in experiment '{params.mlflow.experiment}'; browse: {browse}")
            for result in tracked.promotions.values():
                print(result.summary())
        return 0

    if args.command in ("register", "promote", "rollback", "predict"):
        return _registry_command(args, params, layout)
    if args.command == "explain":
        return _explain(args, params)
    raise AssertionError(f"unhandled command {args.command}")


def _prefect_environment(quiet: bool) -> None:
    """Settings of a local Prefect run, made before prefect is imported: without PREFECT_API_URL the flow runs
    on a temporary server whose database stays in .prefect/ (`PREFECT_HOME=.prefect prefect server start` shows
    the runs afterwards); library logs go to the flow run's log; no usage analytics."""
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "cass")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if quiet:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_demo_console)


def _demo_console(record: logging.LogRecord) -> bool:
    """The console of `cass demo`: stage lines and the library's messages, without Prefect's HTTP requests and
    task bookkeeping; a failure is printed once, by the CLI, instead of once per task, flow and state."""
    if record.name.startswith(("httpx", "httpcore")):
        return record.levelno >= logging.WARNING
    if record.name == "prefect.task_runs":
        return logging.WARNING <= record.levelno < logging.ERROR
    if record.name == "prefect.flow_runs":
        return record.levelno < logging.ERROR
    return True


def _beside_python(command: str) -> str:
    """``command`` from this interpreter's environment, relative when it lies under the working directory."""
    path = Path(sys.executable).parent / command
    if not path.is_file():
        return command
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _demo_flow(args: argparse.Namespace, params, layout) -> int:
    """`cass demo`: the retraining flow in this process, then where to look at the result."""
    from cass.tracking import configure, is_server, redact, tracking_uri

    configure(params.mlflow)  # a tracking server that does not answer fails here, before Prefect starts
    _prefect_environment(args.quiet)
    from flows.retrain import retrain

    state = retrain(params_file=args.params, overrides=list(args.overrides), tune_trials=args.tune_trials,
                    outputs=str(layout.root), force=args.force, return_state=True)
    result = state.result()  # raises the error that failed the run
    flow_run_id = state.state_details.flow_run_id

    if result["outcome"] == "unchanged":
        print(f"\nnothing changed since the completed pipeline run {result['run_id']}: nothing trained "
              "(--force retrains)")
    else:
        _print_metrics(result["metrics"])
        print(f"\noutputs under {layout.root}/: confusion matrices and ROC curves in {layout.root}/evaluate/<network>/")
        if result["pretraining"]["reused"]:
            print(f"pretraining reused (run {result['pretraining']['run_id']})")
    uri = redact(tracking_uri(params.mlflow))
    browse = uri if is_server(uri) else f"{_beside_python('mlflow')} ui --backend-store-uri {uri}"
    print(f"\nMLflow: pipeline run {result['run_id']} in experiment '{params.mlflow.experiment}'; UI: {browse}")
    api = os.environ.get("PREFECT_API_URL")
    if api:
        print(f"Prefect: flow run {flow_run_id}; UI: {api.removesuffix('/').removesuffix('/api')}/runs/flow-run/"
              f"{flow_run_id}")
    else:
        home = os.path.relpath(os.environ["PREFECT_HOME"])
        print(f"Prefect: flow run {flow_run_id}, kept in {home}/; open the UI: PREFECT_HOME={home} "
              f"{_beside_python('prefect')} server start, then http://127.0.0.1:4200/runs/flow-run/{flow_run_id}")
    if result["outcome"] == "unchanged":
        for network, champion in result["champions"].items():
            print(f"{network}: champion {champion or 'none'}")
    else:
        for promotion in result["promotions"].values():
            print(promotion["summary"])
    return 0


def _explain(args: argparse.Namespace, params) -> int:
    """`cass explain` (issue 16): overlays written by cass.explain."""
    from cass import tracking
    from cass.explain import explain_files

    if not Path(args.model).is_dir():
        tracking.configure_client(params.mlflow)
    for path in explain_files(args.model, list(args.images), args.out, params.evaluate.vit_explainer):
        print(path)
    return 0


def _registry_command(args: argparse.Namespace, params, layout) -> int:
    from cass import registry, tracking

    if args.command == "register":
        versions = tracking.register_outputs(params, layout, _networks(args, params), Path(args.params))
        for mv in versions.values():
            print(f"registered {mv.name} version {mv.version}")
        return 0
    if args.command == "predict":
        from cass.data.manifest import atomic_write_text
        from cass.serving import predict_files

        tracking.configure_client(params.mlflow)
        table = predict_files(args.model, list(args.images))
        if args.output:
            atomic_write_text(args.output, table.to_csv(index=False, float_format="%.6f"))
            print(f"wrote {len(table)} predictions to {args.output}")
        else:
            print(table.to_csv(index=False, float_format="%.6f"), end="")
        return 0
    tracking.configure_client(params.mlflow)
    name = args.model or registry.model_name(params.mlflow, args.network)
    if args.command == "rollback":
        result = registry.rollback(name, params, reason=args.reason)
        print(f"{name}: champion v{result.previous} -> v{result.champion} ({result.reason})")
        return 0
    version = args.version or registry.latest_version(name)
    result = registry.promote(name, version, params, force=args.force, reason=args.reason)
    print(result.summary())
    return 0 if result.promoted else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging(args)
    try:
        launched = _distributed_launch(args)
        return run(args) if launched is None else launched
    except CassError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        if "RANK" in os.environ and "torch.distributed" in sys.modules:
            from cass.distributed import cleanup

            cleanup()


if __name__ == "__main__":
    sys.exit(main())
