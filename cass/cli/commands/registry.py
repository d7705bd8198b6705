"""`cass register | promote | rollback | registry | predict`: models in the MLflow registry (cass.tracking,
cass.registry, cass.serving)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cass.cli.settings import networks, outputs, settings
from cass.errors import DataError

if TYPE_CHECKING:
    from cass.config import Params


def register(args: argparse.Namespace) -> int:
    """Log the fine-tuned networks on disk as MLflow models and register them."""
    from cass.quality.policy import committed_policy
    from cass.tracking import register_outputs

    params = settings(args)
    policy = committed_policy(args.params, params)  # what promotion will ask; recorded on the version
    versions = register_outputs(params, outputs(args), networks(args, params), policy=policy)
    for mv in versions.values():
        print(f"registered {mv.name} version {mv.version}")
    return 0


def _champion_of(args: argparse.Namespace) -> tuple[str, Params]:
    """The registered model that --model or --network names, and the settings; the MLflow client is set up."""
    from cass.registry import model_name
    from cass.tracking import configure_client

    params = settings(args)
    configure_client(params.mlflow)
    return args.model or model_name(params.mlflow, args.network), params


def promote(args: argparse.Namespace) -> int:
    """Move 'champion' to --version (default: the latest) behind the gate; exit 1 when refused."""
    from cass.quality.policy import committed_policy
    from cass.registry import latest_version, promote

    name, params = _champion_of(args)
    result = promote(name, args.version or latest_version(name), params, force=args.force, reason=args.reason,
                     policy=committed_policy(args.params, params))
    print(result.summary())
    return 0 if result.promoted else 1


def rollback(args: argparse.Namespace) -> int:
    """Move 'champion' back to the version recorded as previous_champion."""
    from cass.registry import rollback

    name, params = _champion_of(args)
    result = rollback(name, params, reason=args.reason)
    print(f"{result.change()} ({result.reason})")
    return 0


def show(args: argparse.Namespace) -> int:
    """Each registered model's champion: when, why and by whom it was made champion, and every decision since."""
    from cass.champion_history import model_status
    from cass.registry import registered_models
    from cass.tracking import configure_client

    configure_client(settings(args).mlflow)
    names = [args.model] if args.model else registered_models()
    if not names:
        print("no registered models yet; `cass demo` or `cass register` registers the fine-tuned networks")
    for i, name in enumerate(names):
        print(("\n" if i else "") + "\n".join(model_status(name).lines()))
    return 0


def _dataset_images(params: Params) -> list[str]:
    """Every image file of the settings' dataset, as its registered layout lists them."""
    from cass.data.layouts import get_layout
    from cass.data.problems import Problems

    listed = get_layout(params.data.layout).list_files(params.data, Problems())
    paths = [str(listed.root / p) for p in listed.rows["path"]]
    if paths and not Path(paths[0]).is_file():
        raise DataError(f"--dataset: the images of layout '{params.data.layout}' are not files on disk "
                        f"({paths[0]}); `cass data prepare` and predict the prepared images instead")
    return paths


def predict(args: argparse.Namespace) -> int:
    """Predictions of any number of images, printed or written as CSV/Parquet; exit 3 when some were skipped.

    Everything that can be wrong with the command (options, inputs, settings) is checked before torch and
    MLflow load."""
    import tempfile

    from cass.predict import plan, predict_to_file, resolve_inputs

    output = args.output or Path(tempfile.mkdtemp(prefix="cass-predict-")) / "predictions.csv"
    plan(args.model, (), output, batch_size=args.batch_size, workers=args.workers, chunk_size=args.chunk_size,
         lanes=args.lanes)
    params = settings(args)
    inputs = resolve_inputs(args.images, args.csv, _dataset_images(params) if args.dataset else ())
    job = plan(args.model, inputs, output, batch_size=args.batch_size, workers=args.workers,
               chunk_size=args.chunk_size, lanes=args.lanes)
    if not Path(args.model).is_dir():
        from cass.tracking import configure_client

        configure_client(params.mlflow)
    summary = predict_to_file(job)
    if args.output:
        print(summary.line())
    else:
        print(output.read_text(), end="")
    if summary.skipped:
        from cass.outputs import PredictionOutputs

        skipped = PredictionOutputs(output).skipped
        import csv

        with open(skipped, newline="") as fh:
            first = next(csv.DictReader(fh))["problem"]
        raise DataError(f"{summary.skipped} of {len(inputs)} image(s) could not be used and were skipped, "
                        f"listed in {skipped}; first: {first}")
    return 0
