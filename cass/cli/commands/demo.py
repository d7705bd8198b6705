"""`cass demo`: every stage on the demo dataset, in one of three ways. By default the Prefect retraining flow
(flows.demo); --no-flow / --no-promote the same stages tracked in this process; --no-mlflow the stages
alone. All three run the stage list of cass.pipeline."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from cass.cli.output import pretraining_lines, print_metrics, print_where_outputs_are
from cass.cli.settings import outputs, settings

if TYPE_CHECKING:
    from cass.config import Params
    from cass.outputs import Layout

log = logging.getLogger("cass")


def demo(args: argparse.Namespace) -> int:
    """Generate the demo data if needed and run every stage on it (see the module docstring for the three ways)."""
    params, layout = settings(args), outputs(args)
    if args.no_mlflow:
        return _stages_only(args, params, layout)
    if args.no_flow or args.no_promote:
        return _tracked(args, params, layout)
    return _flow(args, params, layout)


def _log_stage(stage: str) -> None:
    log.info("== stage: %s", stage)


def _flow(args: argparse.Namespace, params: Params, layout: Layout) -> int:
    """The retraining flow in this process, then where to look at the result."""
    from flows.demo import run_demo

    run = run_demo(params, layout, params_file=args.params, overrides=args.overrides, tune_trials=args.tune_trials,
                   force=args.force, quiet=args.quiet)
    result = run.result
    if run.unchanged:
        print(f"\nnothing changed since the completed pipeline run {result['run_id']}: nothing trained "
              "(--force retrains)")
    else:
        print_metrics(result["metrics"])
        print_where_outputs_are(layout)
        if result["pretraining"]["reused"]:
            print(f"pretraining reused (run {result['pretraining']['run_id']})")
        _print_pretraining(layout)
    for line in (*run.where_to_look, *run.model_lines()):
        print(line)
    return 0


def _tracked(args: argparse.Namespace, params: Params, layout: Layout) -> int:
    """--no-flow: the stages logged to MLflow and registered (promoted unless --no-promote), without Prefect."""
    from cass.pipeline import run_pipeline_with_mlflow
    from cass.tracking import experiment_id, tracking_uri, where_to_browse

    tracked = run_pipeline_with_mlflow(params, layout, params_file=Path(args.params), promote=not args.no_promote,
                               progress=not args.quiet, on_stage=_log_stage, force=args.force)
    print_metrics(tracked.results)
    print_where_outputs_are(layout)
    _print_pretraining(layout)
    browse = where_to_browse(tracking_uri(params.mlflow), experiment_id(params.mlflow))
    print(f"MLflow run {tracked.run_id} in experiment '{params.mlflow.experiment}'; browse: {browse}")
    for result in tracked.promotions.values():
        print(result.summary())
    if tracked.failure is not None:  # the networks that passed were registered; say which failed, exit 5
        raise tracked.failure
    return 0


def _stages_only(args: argparse.Namespace, params: Params, layout: Layout) -> int:
    """--no-mlflow: the stages alone, no Prefect, tracking or registry."""
    from cass.pipeline import run_pipeline

    print_metrics(run_pipeline(params, layout, progress=not args.quiet, on_stage=_log_stage))
    print_where_outputs_are(layout)
    _print_pretraining(layout)
    return 0


def _print_pretraining(layout: Layout) -> None:
    for line in pretraining_lines(layout.pretrain):
        print(line)
