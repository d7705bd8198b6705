"""`cass study`: a label-efficiency study of the configured dataset (cass.study, docs/study.md)."""

from __future__ import annotations

import argparse

from cass.cli.settings import settings


def study(args: argparse.Namespace) -> int:
    """By default the Prefect flow (flows/study.py); --no-flow the same steps in this process."""
    params = settings(args)
    if args.no_flow:
        from cass.study.runner import run_study

        outcome = run_study(params, args.outputs, tracked=not args.no_mlflow).as_dict()
    else:
        from flows.demo import prefect_environment

        prefect_environment(quiet=args.quiet)  # before prefect is imported: a local server when none is named
        from flows.study import run_study_flow

        outcome = run_study_flow(params, args.params, args.overrides, args.outputs, tracked=not args.no_mlflow)
    print(f"study {outcome['study']}: {len(outcome['ran'])} cell(s) trained, {len(outcome['skipped'])} already done")
    print(f"recommended: {outcome['recommended']} ({outcome['reason']})")
    print(f"report: {outcome['report']}")
    print(f"settings fragment: {outcome['fragment']}")
    if outcome.get("parent_run_id"):
        print(f"MLflow parent run: {outcome['parent_run_id']}")
    return 0
