"""The label-efficiency study as a Prefect flow: the steps of :mod:`cass.study.runner`, each cell a task.

    prepare + plan -> MLflow parent run -> pretrain (method, seed) tasks -> cell tasks (each waits for its
      pretraining only) -> conclude: statistics, rule, recommendation, report (a Prefect markdown artifact too)

The flow's task runner trains ``study.parallel`` tasks at a time (threads of the worker that runs the flow:
one GPU each, or the cores of a CPU machine); a deployment of it on the work pool (prefect.yaml,
``study-on-demand``) runs it on a worker of the pool. With ``group_deployment`` (``study-group`` in
prefect.yaml) the study instead spreads over the pool's workers: one flow run of :func:`study_group` per
(method, seed), its pretraining then its cells, as prediction spreads its shards (flows/predict.py); the
outputs folder must then be one every worker reaches. Rerun after a failure or a kill: finished cells are
skipped (their result files and finished MLflow child runs), interrupted ones resume from their checkpoints.

    prefect deployment run 'cass-study/study-on-demand' -p overrides='["study.seeds=[1,2,3]"]'
    python -m flows.study --set study.methods='[no pretraining, CASS simsiam + vicreg]'
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from cass.config import Params, load_params
from cass.study import runner
from cass.study.cells import run_pretraining
from cass.study.plan import Cell, Pretraining, StudyPlan

FLOW_NAME = "cass-study"
GROUP_FLOW_NAME = "cass-study-group"
REPORT_KEY = "study-report"


@task(name="study-pretrain", cache_policy=NO_CACHE, task_run_name="pretrain {p.method} seed {p.seed}")
def pretrain_task(plan: StudyPlan, p: Pretraining) -> dict[str, Any]:
    return run_pretraining(plan, p)


@task(name="study-cell", cache_policy=NO_CACHE, task_run_name="cell {cell.method} seed {cell.seed} "
      "lf {cell.fraction} {cell.network}")
def cell_task(plan: StudyPlan, cell: Cell, tracker: Any) -> dict[str, Any]:
    return runner.train_cell(plan, cell, tracker)


@flow(name=GROUP_FLOW_NAME, log_prints=False)
def study_group(params_file: str, overrides: Sequence[str], outputs: str, method: str, seed: int,
                tracked: bool = True) -> dict[str, Any]:
    """The missing cells of one method and seed of a study the study flow planned (its data prepared, its parent
    run open): the method's pretraining of that seed, then each cell in a child run of the parent."""
    from cass.outputs import Layout
    from cass.study.plan import make_plan
    from cass.study.tracking import StudyTracker
    from flows.retrain import library_logs_to_the_run_log

    library_logs_to_the_run_log()
    params = load_params(params_file, list(overrides))
    plan = make_plan(params, Layout(Path(outputs)).data, Path(outputs))
    tracker = StudyTracker.attach(plan) if tracked else None
    cells = [c for c in plan.missing() if c.method == method and c.seed == seed]
    if cells and cells[0].pretraining is not None:
        run_pretraining(plan, cells[0].pretraining)
    for cell in cells:
        runner.train_cell(plan, cell, tracker)
    get_run_logger().info("study %s: %s seed %d: %d cell(s) trained", plan.key, method, seed, len(cells))
    return {"ran": [c.key for c in cells]}


def _spread(plan: StudyPlan, missing: Sequence[Cell], deployment: str, params_file: str, overrides: Sequence[str],
            outputs: str, tracked: bool, timeout_s: float) -> None:
    """One flow run of ``deployment`` (:func:`study_group`) per (method, seed) with missing cells; wait for all."""
    from prefect.deployments import run_deployment

    from flows.predict import _wait

    groups = list(dict.fromkeys((c.method, c.seed) for c in missing))
    submitted = [run_deployment(deployment, timeout=0, flow_run_name=f"study {plan.key}: {method} seed {seed}",
                                parameters={"params_file": str(Path(params_file).resolve()),
                                            "overrides": list(overrides), "outputs": str(Path(outputs).resolve()),
                                            "method": method, "seed": seed, "tracked": tracked}).id
                 for method, seed in groups]
    get_run_logger().info("study %s: %d group flow run(s) submitted to %s", plan.key, len(submitted), deployment)
    failed = [f"{run.name}: {run.state.message}" for run in _wait(submitted, timeout_s) if not run.state.is_completed()]
    if failed:
        raise RuntimeError(f"{len(failed)} study group(s) failed (rerun the flow: finished cells are kept): "
                           + "; ".join(failed))


@flow(name=FLOW_NAME, log_prints=False)
def study_flow(params_file: str = "params.yaml", overrides: Sequence[str] = (), outputs: str = "outputs",
               tracked: bool = True, group_deployment: str | None = None,
               timeout_s: float = 7 * 24 * 3600) -> dict[str, Any]:
    """A study of ``study.*`` on the configured data; returns what ran, what was skipped and the answer.
    ``group_deployment`` (e.g. ``cass-study-group/study-group``) spreads the cells over the pool's workers."""
    from flows.retrain import library_logs_to_the_run_log

    library_logs_to_the_run_log()
    logger = get_run_logger()
    params = load_params(params_file, list(overrides))
    plan = runner.prepare(params, Path(outputs))
    tracker = runner.open_tracking(plan) if tracked else None
    missing = plan.missing()
    skipped = [c.key for c in plan.cells if c not in missing]
    logger.info("study %s: %d cells, %d done, %d to run", plan.key, len(plan.cells), len(skipped), len(missing))
    if group_deployment:
        try:
            _spread(plan, missing, group_deployment, params_file, overrides, outputs, tracked, timeout_s)
            outcome = runner.conclude(plan, tracker)
        except BaseException:
            if tracker is not None:
                tracker.fail("FAILED")
            raise
        outcome.ran, outcome.skipped = [c.key for c in missing], skipped
        return _publish(outcome)
    try:
        pretrained = {p: pretrain_task.submit(plan, p) for p in runner.needed_pretrainings(plan, missing)}
        futures = {c.key: cell_task.submit(plan, c, tracker, wait_for=[pretrained[c.pretraining]]
                                           if c.pretraining in pretrained else [])
                   for c in missing}
        failed = []
        for key, future in futures.items():
            try:
                future.result()
            except Exception as exc:  # every failure is listed, then the run fails
                failed.append(f"{key}: {exc}")
        if failed:
            raise RuntimeError(f"{len(failed)} study cell(s) failed (rerun the flow: finished cells are kept): "
                               + "; ".join(failed))
        outcome = runner.conclude(plan, tracker)
    except BaseException:
        if tracker is not None:
            tracker.fail("FAILED")
        raise
    outcome.ran, outcome.skipped = list(futures), skipped
    return _publish(outcome)


def _publish(outcome: runner.StudyOutcome) -> dict[str, Any]:
    """The report's markdown as the flow run's artifact; the outcome as the flow's result."""
    create_markdown_artifact(Path(outcome.plan.report_dir / "study.md").read_text(), key=REPORT_KEY,
                             description=f"Label-efficiency study {outcome.plan.key}")
    return outcome.as_dict()


def run_study_flow(params: Params, params_file: str, overrides: Sequence[str], outputs: str,
                   tracked: bool = True) -> dict[str, Any]:
    """The flow with ``study.parallel`` task slots, in this process."""
    runner_ = ThreadPoolTaskRunner(max_workers=params.study.parallel)
    return study_flow.with_options(task_runner=runner_)(params_file, list(overrides), outputs, tracked)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--outputs", default="outputs")
    ap.add_argument("--no-mlflow", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    params = load_params(args.params, args.overrides)
    print(json.dumps(run_study_flow(params, args.params, args.overrides, args.outputs, not args.no_mlflow)))


if __name__ == "__main__":
    main()
