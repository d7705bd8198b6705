"""`cass register | promote | rollback | registry | predict`: models in the MLflow registry (cass.tracking,
cass.registry, cass.serving)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cass.cli.settings import networks, outputs, settings

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
    from cass.registry import model_status, registered_models
    from cass.tracking import configure_client

    configure_client(settings(args).mlflow)
    names = [args.model] if args.model else registered_models()
    if not names:
        print("no registered models yet; `cass demo` or `cass register` registers the fine-tuned networks")
    for i, name in enumerate(names):
        print(("\n" if i else "") + "\n".join(model_status(name).lines()))
    return 0


def predict(args: argparse.Namespace) -> int:
    """Class probabilities of image files from a registered model, printed or written as CSV."""
    from cass.io import atomic_write_text
    from cass.serving import predict_files
    from cass.tracking import configure_client

    configure_client(settings(args).mlflow)
    table = predict_files(args.model, list(args.images))
    csv = table.to_csv(index=False, float_format="%.6f")
    if args.output:
        atomic_write_text(args.output, csv)
        print(f"wrote {len(table)} predictions to {args.output}")
    else:
        print(csv, end="")
    return 0
