"""The cells of a study and where each writes, so that a rerun finds what is done and runs only the rest.

A cell is one (method, seed, label fraction, network): fine-tune ``network`` on the fraction's labelled subset
from the method's pretraining of that seed, and evaluate it on the test split. Pretraining does not depend on
the label fraction or on which network is later fine-tuned (it uses every unlabelled training image and
trains both networks together), so it runs once per (method, seed) and its cells share it.

    <outputs>/study/<key>/
      study.json                          what the study is (settings, data) and its MLflow parent run
      pretrain/<method>/seed-<s>/         Layout(root).pretrain + pretraining.json (wall time, images/s)
      cells/<method>/seed-<s>/lf-<f>/<network>/
                                          Layout(root).finetune/evaluate(<network>) + result.json
      report/                             study.html, study.md, macro_f1.png, results.csv, recommendation.yaml

``result.json`` is written last and atomically: a cell with one is done. The key is a hash of the prepared
data and of every setting that changes a result, so a changed setting starts a new study folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cass.config import Network, Params, with_values
from cass.errors import ConfigError
from cass.io import atomic_write_text
from cass.outputs import Layout
from cass.study.methods import changes, check_methods, pretrains, slug

RESULT_FILE = "result.json"
PRETRAINING_FILE = "pretraining.json"
STUDY_FILE = "study.json"


@dataclass(frozen=True)
class Pretraining:
    """One pretraining of a study: a method (that pretrains) and a seed."""

    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method} seed {self.seed}"


@dataclass(frozen=True)
class Cell:
    method: str
    seed: int
    fraction: float
    network: Network

    @property
    def name(self) -> str:
        return f"{self.method} seed {self.seed} lf {self.fraction:g} {self.network}"

    @property
    def key(self) -> str:
        """Identifies the cell among the study's child runs (a tag)."""
        return f"{slug(self.method)}/seed-{self.seed}/lf-{self.fraction:g}/{self.network}"

    @property
    def pretraining(self) -> Pretraining | None:
        return Pretraining(self.method, self.seed) if pretrains(self.method) else None


@dataclass(frozen=True)
class StudyPlan:
    """A study on prepared data: its settings, its folder and its cells."""

    params: Params
    data_dir: Path
    root: Path
    key: str
    data_hash: str

    @property
    def cells(self) -> list[Cell]:
        s = self.params.study
        return [Cell(m, seed, f, n) for m in s.methods for seed in s.seeds for f in s.fractions for n in s.networks]

    @property
    def pretrainings(self) -> list[Pretraining]:
        s = self.params.study
        return [Pretraining(m, seed) for m in s.methods if pretrains(m) for seed in s.seeds]

    @property
    def decision_fraction(self) -> float:
        s = self.params.study
        return s.decision_fraction if s.decision_fraction is not None else min(s.fractions)

    def pretrain_layout(self, p: Pretraining) -> Layout:
        return Layout(self.root / "pretrain" / slug(p.method) / f"seed-{p.seed}")

    def cell_layout(self, cell: Cell) -> Layout:
        return Layout(self.root / "cells" / cell.key)

    def result_file(self, cell: Cell) -> Path:
        return self.cell_layout(cell).root / RESULT_FILE

    def pretraining_file(self, p: Pretraining) -> Path:
        return self.pretrain_layout(p).root / PRETRAINING_FILE

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def study_file(self) -> Path:
        return self.root / STUDY_FILE

    def pretrain_params(self, p: Pretraining) -> Params:
        return with_values(self.params, {"seed": p.seed, **changes(p.method)}, "study settings")

    def cell_params(self, cell: Cell) -> Params:
        return with_values(self.params, {"seed": cell.seed, **changes(cell.method),
                                          "finetune.label_fraction": cell.fraction}, "study settings")

    def done(self, cell: Cell) -> dict[str, Any] | None:
        """The cell's result when it finished (in this or an earlier run of the study), else None."""
        path = self.result_file(cell)
        return json.loads(path.read_text()) if path.is_file() else None

    def missing(self) -> list[Cell]:
        return [c for c in self.cells if self.done(c) is None]

    def results(self) -> list[dict[str, Any]]:
        return [r for r in (self.done(c) for c in self.cells) if r is not None]

    def record(self, **extra: Any) -> None:
        """study.json: what the study is, and (``extra``) what it found out about itself (its parent run)."""
        doc = json.loads(self.study_file.read_text()) if self.study_file.is_file() else {}
        s = self.params.study
        doc.update({"key": self.key, "data_hash": self.data_hash, "dataset": self.params.data.name,
                    "methods": list(s.methods), "fractions": list(s.fractions), "seeds": list(s.seeds),
                    "networks": list(s.networks), **extra})
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.study_file, json.dumps(doc, indent=2) + "\n")

    def recorded(self, name: str) -> Any:
        return json.loads(self.study_file.read_text()).get(name) if self.study_file.is_file() else None


def study_key(params: Params, data_hash: str) -> str:
    from cass.run_keys import result_settings

    s = params.study
    payload = {"data": data_hash, "settings": result_settings(params, tuning=False),
               "study": {"methods": list(s.methods), "fractions": list(s.fractions), "seeds": list(s.seeds),
                         "networks": list(s.networks)}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def make_plan(params: Params, data_dir: Path, outputs: Path) -> StudyPlan:
    """The study of ``params.study`` on the prepared data in ``data_dir``, under ``<outputs>/study``; checks the
    settings before anything trains."""
    from cass.run_keys import data_hash

    s = params.study
    check_methods(s.methods)
    missing = [f for f in s.fractions if f not in params.split.label_fractions]
    if missing:
        raise ConfigError(f"study.fractions {missing} are not in split.label_fractions "
                          f"{list(params.split.label_fractions)}: add them there (the prepared data holds a subset "
                          "per listed fraction) or remove them from study.fractions")
    digest = data_hash(data_dir)
    key = study_key(params, digest)
    return StudyPlan(params, Path(data_dir), Path(outputs) / "study" / key, key, digest)
