"""The commands of ``cass``, their options and help, and the handler each one runs (``set_defaults(func=...)``).

Options shared by several commands are declared once, by the helpers below: the settings group
(``--params``, ``--set``, ``--outputs``, ``-q``, ``-v``), ``--network`` and ``--nproc``. Building the parser
imports only the handler modules, which import their libraries when they run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from cass.cli.commands import data, demo, explain, quality, registry, study, train, versioning
from cass.config import NETWORKS
from cass.data.layouts import layout_help, layout_names
from cass.errors import GateFailed

Handler = Callable[[argparse.Namespace], int]
"""A command: the parsed arguments in, the exit status out."""

EPILOG = """examples:
  cass demo                                  # generate the demo data and run every stage on CPU
  cass data prepare --set split.seed=1       # manifest, splits and label-fraction subsets
  cass pretrain --set pretrain.epochs=3      # CASS pretraining of the CNN and the ViT
  cass finetune --network both               # fine-tune both at finetune.label_fraction
  cass evaluate --network cnn                # test metrics, confusion matrix, ROC curves
  cass tune --network cnn --workers 2        # Optuna search; then cass finetune --best-params FILE
  cass dvc-yaml                              # rewrite dvc.yaml after changing finetune.init or tune.enabled
  cass promote --network cnn --version 3     # move 'champion' to v3 if it passes the gate and beats it
  cass registry                              # each model's champion, why and by whom, and its history
  cass predict --model models:/cass-demo-cnn@champion img1.png img2.png
  cass explain --model models:/cass-demo-vit@champion img1.png   # heat maps of what it looks at
  cass study --set study.seeds=[1,2,3]      # does pretraining pay on this data? report + recommendation
  cass validate manifest                     # data-quality gate before training (also: splits, model)
"""


_FINETUNE_NETWORKS = "which network (default: %(default)s = finetune.networks)"


# --------------------------------------------------------------------------------------------------
# Shared options


def settings_options(parser: argparse.ArgumentParser) -> None:
    """--params, --set, --outputs, -q and -v: every command that reads the settings takes them."""
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


def network_option(
    parser: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup, *, both: bool = True,
    help: str = _FINETUNE_NETWORKS,
) -> None:
    """--network: one of cass.config.NETWORKS, or (``both``) also "both", the default, meaning every network of
    finetune.networks. Without ``both`` there is no default (promote and rollback name one model)."""
    if both:
        parser.add_argument("--network", choices=[*NETWORKS, "both"], default="both", help=help)
    else:
        parser.add_argument("--network", choices=list(NETWORKS), help=help)


def nproc_option(parser: argparse.ArgumentParser) -> None:
    """--nproc: the commands that can train data-parallel (cass.cli.app relaunches them under torchrun)."""
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train data-parallel in N processes on this machine (one per GPU), re-launched under "
        "`torchrun --standalone --nproc_per_node N`; batch_size stays the global batch (default: %(default)s)",
    )


def _command(sub: argparse._SubParsersAction, name: str, handler: Handler, *, help: str,
             description: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=description)
    parser.set_defaults(func=handler)
    return parser


# --------------------------------------------------------------------------------------------------
# The commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cass",
        description="CASS: Cross-Architectural Self-Supervision for medical image classification. A CNN and "
        "a ViT are pretrained together without labels, then each is fine-tuned with few labels.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _data_commands(sub)
    _training_commands(sub)
    _validate_command(sub)
    _demo_command(sub)
    _study_command(sub)
    _registry_commands(sub)
    p = _command(sub, "models", train.list_models, help="list timm model names usable as model.cnn / model.vit",
                 description="List the timm model names the factory accepts (the registered models and their "
                 "champions: `cass registry`).")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'resnet*' (default: all)")
    return parser


def _data_commands(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser(
        "data",
        help="dataset commands: demo, prepare, show; versioning: add, remote, push, pull, verify",
        description="Generate the demo dataset, build the manifest, show class counts; version datasets "
        "with DVC (data.dvc) and move them to and from an S3 remote. See docs/dvc.md.",
    )
    dsub = group.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    p = _command(dsub, "demo", data.demo_data, help="generate the embedded demo dataset at data.root",
                 description="Write the synthetic tissue-patch dataset (4 classes) as an ImageFolder tree.")
    p.add_argument("--out", metavar="DIR", help="target folder (default: data.root)")
    p.add_argument("--force", action="store_true", help="regenerate even if it is already there")
    p.add_argument("--dicom", action="store_true",
                   help="write a synthetic CT set in DICOM instead (2 classes, data.demo_images_per_class each), for "
                   "the dicom layout: give --out and add it with `cass data add DIR --layout dicom`")
    settings_options(p)
    settings_options(_command(
        dsub, "prepare", data.prepare, help="manifest, splits and label-fraction subsets",
        description="Read the dataset (data.layout), hash and decode every image, assign "
        "stratified seeded splits and write label-fraction subsets to <outputs>/data.",
    ))
    settings_options(_command(
        dsub, "show", data.show, help="class counts per split of the prepared data",
        description="Print the classes, split sizes and data version of <outputs>/data.",
    ))
    _data_versioning_commands(dsub)


def _data_versioning_commands(dsub: argparse._SubParsersAction) -> None:
    """`cass data add|remote|push|pull|verify`: DVC around the dataset (cass.versioning)."""
    p = _command(
        dsub, "add", versioning.add, help="version a dataset with DVC (data.dvc) and point params.yaml at it",
        description="Track PATH in data.dvc and set data.name, data.root and data.layout in params.yaml, so "
        "`dvc repro` builds from it. A folder outside the project is copied (or moved, --move) to "
        "data/<name>; one inside is tracked where it is. --set data.KEY=VALUE settings (e.g. data.csv.file) "
        "are written to params.yaml with it. Then commit data.dvc, data/.gitignore and params.yaml.",
    )
    p.add_argument("path", type=Path, help="the dataset folder")
    layouts = layout_help().replace("\n", "; ")
    p.add_argument("--layout", required=True, choices=layout_names(), help=f"how it is organised; {layouts}")
    p.add_argument("--name", help="dataset name, also the folder data/<name> (default: the folder's name)")
    p.add_argument("--move", action="store_true", help="move a folder from outside the project instead of copying")
    settings_options(p)
    p = _command(
        dsub, "remote", versioning.remote, help="configure (URL given) or show the S3 remote that push and pull use",
        description="Make s3://BUCKET/PATH the default DVC remote. MinIO and other S3-compatible stores: "
        "--endpoint-url. Credentials are never stored by this command: set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (or ~/.aws), or `dvc remote modify --local NAME access_key_id ...`.",
    )
    p.add_argument("url", nargs="?", help="s3://BUCKET/PATH; without it, show the configured remote")
    p.add_argument("--name", default="store", help="remote name (default: %(default)s)")
    p.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint, e.g. http://minio:9000 (default: AWS)")
    p.add_argument("--region", help="bucket region")
    p.add_argument("--local", action="store_true", help="write to .dvc/config.local (kept out of git)")
    settings_options(p)
    for verb, text in (("push", "upload the data and pipeline outputs to"), ("pull", "download them from")):
        p = _command(
            dsub, verb, versioning.transfer, help=f"dvc {verb}: {text} the remote, after checking it",
            description=f"`dvc {verb}` ({text} the remote) after checking that a remote is configured and its "
            "endpoint answers (3 tries), and re-hashing the local DVC cache: push refuses corrupted objects, "
            "pull replaces them with the remote's copy.",
        )
        p.add_argument("targets", nargs="*", help="DVC files or stages (default: everything)")
        p.add_argument("-r", "--remote", help="remote name (default: the default remote)")
        p.add_argument("-j", "--jobs", type=int, help="parallel transfers")
        p.add_argument("--no-verify", action="store_true", help="skip re-hashing the local cache (large datasets)")
        settings_options(p)
    p = _command(
        dsub, "verify", versioning.verify, help="re-hash the DVC cache objects of data.dvc and dvc.lock",
        description="DVC trusts a cache file whose size and mtime did not change; this re-hashes every object "
        "the project refers to and lists those whose content does not match their md5.",
    )
    p.add_argument("--remove", action="store_true", help="delete corrupted objects (then `cass data pull`)")
    settings_options(p)


def _training_commands(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub, "pretrain", train.pretrain, help="CASS self-supervised pretraining of the CNN and the ViT",
        description="Train both networks on every unlabelled training image with the CASS loss. "
        "Checkpoints each epoch to <outputs>/pretrain and resumes after an interruption. "
        "--method dino pretrains each network with the DINO baseline instead, into the same files.",
    )
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start over")
    nproc_option(p)
    p.add_argument(
        "--method", choices=["cass", "dino"], help="pretraining method (default: pretrain.method from the settings)"
    )
    settings_options(p)

    p = _command(
        sub, "finetune", train.finetune, help="fine-tune the CNN and/or the ViT at a label fraction",
        description="Supervised fine-tuning with focal loss on the finetune.label_fraction subset, "
        "early stopping on validation loss; writes <outputs>/finetune/<network>.",
    )
    network_option(p)
    p.add_argument(
        "--best-params",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="a best_<network>.yaml from `cass tune`: its finetune settings replace params.yaml's for that "
        "network (repeatable, one file per network)",
    )
    nproc_option(p)
    settings_options(p)

    _tune_command(sub)

    p = _command(
        sub, "evaluate", train.evaluate, help="test metrics of fine-tuned networks",
        description="Macro F1, balanced accuracy, per-class scores, AUROC, confusion matrix and "
        "ROC curves on the test split; writes <outputs>/evaluate/<network>.",
    )
    network_option(p)
    settings_options(p)

    p = _command(
        sub, "dvc-yaml", train.dvc_yaml, help="write dvc.yaml from the stage list and params.yaml",
        description="(Re)write dvc.yaml from the pipeline's stage list and the settings, so that `dvc repro` runs "
        "what the flow runs: pretrain only when finetune.init is cass, tune only when tune.enabled, one item per "
        "finetune.networks. Run it after changing those settings and commit the file; a stage that DVC runs "
        "refuses a stale dvc.yaml.",
    )
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit non-zero, naming what differs, when the file is stale")
    p.add_argument("--output", type=Path, default=Path("dvc.yaml"), metavar="FILE",
                   help="the file to write or check (default: %(default)s)")
    settings_options(p)


def _tune_command(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub, "tune", train.tune,
        help="search fine-tuning settings with Optuna (one process, local workers or many machines)",
        description="An Optuna study per network over the tune.space settings: seeded TPE sampler, pruning on "
        "per-epoch validation reports, tune.objective as the target. Writes <outputs>/tune/best_<network>.yaml "
        "for `cass finetune --best-params`. Trials are stored in a SQLite file under <outputs>/tune unless "
        "--storage (or $CASS_TUNE_STORAGE) names a database that several workers share, e.g. PostgreSQL.",
    )
    network_option(p)
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
    # These three set tune.* settings: the handler passes them to cass.cli.settings as typed updates.
    p.add_argument("--study", metavar="NAME", help="study name prefix (default: tune.study_name)")
    p.add_argument(
        "--n-trials", type=int, metavar="N", help="finished trials over all workers (default: tune.n_trials)"
    )
    p.add_argument(
        "--timeout", type=float, metavar="S", help="seconds after which no trial starts (default: tune.timeout)"
    )
    settings_options(p)


def _validate_command(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub, "validate", quality.validate,
        help="data-quality and model gates (Great Expectations): manifest, splits, model",
        description="Run a gate: 'manifest' before any training (files exist, stay inside the data root, "
        "decode; sizes, modes, labels, class counts), 'splits' before fine-tuning (no image or patient in two "
        "splits, every class in every split, subsets inside train), 'model' before registration (metrics "
        "present, in [0, 1], above the floors, no class with zero recall). Thresholds and severities: the "
        "quality: section of params.yaml. Writes Data Docs HTML and result.json to <outputs>/quality/<gate>; "
        f"exits {GateFailed.exit_code} when a check of severity 'fail' failed.",
    )
    p.add_argument("gate", choices=["manifest", "splits", "model"], help="which gate")
    network_option(
        p, help="model gate: which network's <outputs>/evaluate/<network>/metrics.json (default: %(default)s)"
    )
    p.add_argument("--metrics", metavar="FILE", help="model gate: a metrics.json to check instead")
    p.add_argument("--report", metavar="DIR", help="report folder (default: <outputs>/quality/<gate>)")
    settings_options(p)


def _demo_command(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub, "demo", demo.demo, help="run the retraining flow end to end on the embedded demo dataset",
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
    p.add_argument("--force", action="store_true",
                   help="retrain everything, pretraining included, even when nothing changed since the last run")
    p.add_argument("--no-flow", action="store_true",
                   help="run the tracked pipeline in this process, without Prefect and without tuning")
    p.add_argument("--no-mlflow", action="store_true", help="run the stages without Prefect, tracking or registry")
    p.add_argument("--no-promote", action="store_true",
                   help="register the models but leave the champion alone (implies --no-flow)")
    settings_options(p)


def _study_command(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub, "study", study.study, help="does pretraining pay on this data, and which recipe? (docs/study.md)",
        description="A label-efficiency study of the configured dataset: each method of study.methods x label "
        "fraction x seed x network through pretrain, finetune and evaluate (pretraining shared per method and "
        "seed), one MLflow parent run with a child run per cell, the Prefect flow flows/study.py. Writes an "
        "offline HTML report (mean ± sd, plot, paired differences, cost, the decision rule) and a settings "
        "fragment that pretrain.variant: auto follows for this data version. A rerun resumes: only missing "
        "cells train.",
    )
    p.add_argument("--no-flow", action="store_true", help="run the study in this process, without Prefect")
    p.add_argument("--no-mlflow", action="store_true", help="no MLflow runs (the report and fragment are written)")
    settings_options(p)


def _registry_commands(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub, "register", registry.register, help="log fine-tuned models on disk to MLflow and register them",
        description="Log <outputs>/finetune/<network> (with its evaluation in <outputs>/evaluate/<network>) "
        "as an MLflow model and register it as <mlflow.model_prefix>-<network>, with the settings, commit and "
        "curves recorded beside the model (lineage.json, history.csv), not those of params.yaml now. Runs the "
        "model gate first: a network that fails is not registered (exit status 5; quality.model_gate_policy). "
        "`cass demo` does this itself.",
    )
    network_option(p, help="(default: %(default)s)")
    settings_options(p)

    p = _command(
        sub, "promote", registry.promote, help="move the 'champion' alias to a registered version, behind the gate",
        description="Promote when the model gate passes and the version beats the champion on the same test "
        "set by mlflow.promotion_margin in mlflow.promotion_metric. The decision is recorded on the version (a "
        "promotion.<n> tag, written before the alias moves) and the model gate's report is attached to its "
        "evaluation run; `cass registry` shows them. Exit status 0: promoted; 1: refused (the champion stays); "
        "7: the registry failed (the champion is as the last complete decision left it).",
    )
    _registered_model_options(p)
    p.add_argument("--version", help="the version to promote (default: the latest)")
    p.add_argument("--force", action="store_true", help="skip the gate and the comparison (needs --reason)")
    p.add_argument("--reason", metavar="TEXT", help="why; recorded on the version (required with --force)")
    settings_options(p)

    p = _command(
        sub, "rollback", registry.rollback, help="move 'champion' back to the previous champion",
        description="Restore the version recorded as previous_champion on the current champion.",
    )
    _registered_model_options(p)
    p.add_argument("--reason", metavar="TEXT", required=True, help="why; recorded on both versions")
    settings_options(p)

    p = _command(
        sub, "registry", registry.show, help="each registered model's champion, why and by whom, and its history",
        description="For each registered model (or MODEL): the champion, when and by whom it was promoted or "
        "restored, the full reason, where the model gate's report of that decision is kept, where a rollback would "
        "go, and every promotion decision about its versions, oldest first (promoted, refused, restored; a "
        "promotion interrupted before the alias moved is marked not applied).",
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="one registered model, e.g. cass-demo-cnn (default: all)")
    settings_options(p)

    p = _command(
        sub, "predict", registry.predict, help="class probabilities of images from a registered model, at any volume",
        description="Load an MLflow model (e.g. models:/cass-demo-cnn@champion) or a fine-tuning folder and write "
        "each image's predicted label(s), per-class probabilities, the model's name, version and URI, and the time, "
        "in batches (images decoded by --workers processes beside the forward pass). With --output, parts are "
        "written every --chunk-size images: rerun the same command after an interruption and it goes on where it "
        "stopped. An image that cannot be read is listed in <output>.skipped.csv and skipped; the run goes on and "
        "exits 3 at the end.",
    )
    p.add_argument("--model", required=True, metavar="URI", help="models:/<name>@champion, models:/<name>/<version>, "
                   "runs:/<run>/model, or a folder such as outputs/finetune/cnn")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files, folders (searched recursively) or glob "
                   "patterns such as 'scans/**/*.png' (quoted)")
    p.add_argument("--csv", type=Path, metavar="FILE", help="also the images in the 'path' column of this CSV "
                   "(relative paths are relative to its folder)")
    p.add_argument("--dataset", action="store_true", help="also every image of the dataset of the settings "
                   "(data.root in its registered data.layout)")
    p.add_argument("--output", type=Path, metavar="FILE", help="write a .csv or .parquet here (resumable) instead "
                   "of printing CSV")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per forward pass "
                   "(default: %(default)s)")
    p.add_argument("--workers", type=int, metavar="N", help="processes decoding images beside the forward pass; "
                   "0: in this process (default: as many as the first batch's timings say pay, often 0 on a CPU)")
    p.add_argument("--lanes", type=int, metavar="N", help="batches scored at once, each on its share of torch's "
                   "threads (default: one per thread, at most 4; 1: one batch at a time on all threads)")
    p.add_argument("--chunk-size", type=int, default=1024, metavar="N", help="images per part written to disk: "
                   "what an interruption can cost (default: %(default)s)")
    settings_options(p)

    p = _command(
        sub, "explain", explain.explain, help="heat maps of what a registered model looks at, for any images",
        description="Load an MLflow model (e.g. models:/cass-demo-cnn@champion) or a fine-tuning folder and "
        "write, per image, the image beside its heat map for the predicted class (CNN: Grad-CAM; ViT: "
        "evaluate.vit_explainer) with the predicted label and probability, as <out>/<image>.<network>.png.",
    )
    p.add_argument("--model", required=True, metavar="URI", help="models:/<name>@champion, models:/<name>/<version>, "
                   "runs:/<run>/model, or a folder such as outputs/finetune/cnn")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (PNG, JPEG, TIFF, ...)")
    p.add_argument("--out", type=Path, default=Path("explanations"), metavar="DIR",
                   help="folder for the overlays (default: %(default)s)")
    settings_options(p)


def _registered_model_options(parser: argparse.ArgumentParser) -> None:
    """--network or --model, exactly one: which registered model promote and rollback move 'champion' of."""
    target = parser.add_mutually_exclusive_group(required=True)
    network_option(target, both=False, help="the model <mlflow.model_prefix>-<network>")
    target.add_argument("--model", metavar="NAME", help="a registered model name")
