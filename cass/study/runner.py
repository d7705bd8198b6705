"""A study from start to answer, in steps the CLI runs in this process and the Prefect flow runs as tasks:

    prepare the data -> plan (what is done already) -> open the MLflow runs -> pretrain each (method, seed)
      -> each missing cell (fine-tune + evaluate, a child run) -> statistics, rule, recommendation, report

A killed study resumes: rerun the same command and only the missing cells train (and an interrupted
pretraining or fine-tuning resumes from its checkpoint).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cass.config import Params
from cass.outputs import Layout
from cass.study import recommend, report, stats
from cass.study.cells import run_cell, run_pretraining
from cass.study.methods import slug
from cass.study.plan import Cell, Pretraining, StudyPlan, make_plan

log = logging.getLogger(__name__)


@dataclass
class StudyOutcome:
    plan: StudyPlan
    ran: list[str] = field(default_factory=list)  # cell keys trained by this run
    skipped: list[str] = field(default_factory=list)  # cell keys an earlier run finished
    decision: stats.Decision | None = None
    report: Path | None = None
    fragment: Path | None = None
    parent_run_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d = self.decision
        return {"study": self.plan.key, "folder": str(self.plan.root), "ran": self.ran, "skipped": self.skipped,
                "recommended": d.recommended if d else None, "reason": d.reason if d else None,
                "report": str(self.report), "fragment": str(self.fragment), "parent_run_id": self.parent_run_id}


def prepare(params: Params, outputs: Path) -> StudyPlan:
    """Prepare the configured dataset into ``<outputs>/data`` (the demo data is generated first) and plan."""
    from cass.data.demo import generate_demo
    from cass.data.prepare import prepare_data

    d = params.data
    if d.name == "demo" and d.layout == "imagefolder":
        generate_demo(Path(d.root), d.demo_images_per_class, d.demo_image_size, kind=d.demo_kind)
    data_dir = prepare_data(params, Layout(Path(outputs)).data)
    return make_plan(params, data_dir, Path(outputs))


def open_tracking(plan: StudyPlan) -> Any:
    """The study's MLflow runs (:class:`cass.study.tracking.StudyTracker`), made consistent with what is on disk."""
    from cass.study.tracking import StudyTracker

    tracker = StudyTracker.start(plan)
    stale = tracker.close_stale()
    if stale:
        log.info("study %s: %d cell run(s) an interrupted run left open marked KILLED", plan.key, stale)
    finished = tracker.finished_cells()
    for cell in plan.cells:
        result = plan.done(cell)
        if result is not None and cell.key not in finished:
            tracker.log_done(cell, result)
    return tracker


def needed_pretrainings(plan: StudyPlan, cells: Sequence[Cell]) -> list[Pretraining]:
    wanted = {c.pretraining for c in cells if c.pretraining is not None}
    return [p for p in plan.pretrainings if p in wanted]


def train_cell(plan: StudyPlan, cell: Cell, tracker: Any = None) -> dict[str, Any]:
    """One missing cell, in its child run when tracked."""
    if tracker is None:
        return run_cell(plan, cell)
    with tracker.cell_run(cell) as run:
        result = run_cell(plan, cell)
        tracker.log_result(run, result)
    return result


def conclude(plan: StudyPlan, tracker: Any = None) -> StudyOutcome:
    """Statistics, the rule, the recommendation and the report from every finished cell."""
    s = plan.params.study
    results = plan.results()
    missing = plan.missing()
    if missing:
        raise RuntimeError(f"study {plan.key}: {len(missing)} cell(s) unfinished, e.g. {missing[0].name}; rerun it")
    pretrainings = [json.loads(plan.pretraining_file(p).read_text()) for p in plan.pretrainings]
    summary = stats.summarize(results)
    pairs = stats.paired(results, s.baseline)
    costs = stats.costs(pretrainings)
    decision = stats.decide(pairs, methods=s.methods, networks=s.networks, baseline=s.baseline,
                            fraction=plan.decision_fraction, min_effect=s.min_effect,
                            cost={c.method: c for c in costs})
    parent = tracker.parent_run_id if tracker is not None else None
    rec = recommend.recommendation(decision.recommended, decision.reason, plan.data_hash, plan.key, parent)
    fragment = recommend.write(plan.params, rec, plan.report_dir)
    p = plan.params
    settings = {"study.methods": ", ".join(s.methods), "study.fractions": list(s.fractions),
                "study.seeds": list(s.seeds), "study.networks": list(s.networks), "model.cnn / model.vit":
                f"{p.model.cnn} / {p.model.vit}", "model.image_size": p.model.image_size,
                "model.pretrained": p.model.pretrained, "pretrain.epochs": p.pretrain.epochs,
                "pretrain.batch_size": p.pretrain.batch_size, "finetune.epochs": p.finetune.epochs,
                "split.seed": p.split.seed}
    findings = report.StudyFindings(p.data.name, plan.data_hash, plan.key, results, summary, pairs, costs, decision,
                                    settings, parent, fragment.read_text())
    page = report.write(findings, plan.report_dir)
    if tracker is not None:
        metrics = {f"{slug(x.method)}.{x.network}.lf{x.fraction:g}.macro_f1_mean": x.mean for x in summary}
        metrics.update({f"{slug(x.method)}.{x.network}.lf{x.fraction:g}.macro_f1_sd": x.sd for x in summary})
        metrics.update({f"{slug(c.method)}.pretrain_seconds": c.seconds for c in costs})
        tracker.finish(plan.report_dir, metrics, {"recommended": decision.recommended,
                                                  "recommendation_reason": decision.reason[:5000]})
    log.info("study %s: recommended %s: %s. Report: %s", plan.key, decision.recommended, decision.reason, page)
    return StudyOutcome(plan, decision=decision, report=page, fragment=fragment, parent_run_id=parent)


def run_study(params: Params, outputs: Path, *, tracked: bool = True,
              on_cell: Callable[[Cell, dict[str, Any]], None] | None = None) -> StudyOutcome:
    """The whole study in this process; ``on_cell`` is told of each cell this run trains."""
    plan = prepare(params, outputs)
    tracker = open_tracking(plan) if tracked else None
    missing = plan.missing()
    skipped = [c.key for c in plan.cells if c not in missing]
    log.info("study %s: %d cell(s), %d done, %d to run, in %s", plan.key, len(plan.cells), len(skipped),
             len(missing), plan.root)
    ran = []
    try:
        for p in needed_pretrainings(plan, missing):
            run_pretraining(plan, p)
        for cell in missing:
            result = train_cell(plan, cell, tracker)
            ran.append(cell.key)
            if on_cell is not None:
                on_cell(cell, result)
        outcome = conclude(plan, tracker)
    except BaseException as exc:
        if tracker is not None:
            import contextlib

            with contextlib.suppress(Exception):
                tracker.fail("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    outcome.ran, outcome.skipped = ran, skipped
    return outcome
