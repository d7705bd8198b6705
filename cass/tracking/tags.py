"""What a run carries and is named by: the lineage tags, the run label and MLflow's context tags.

Every run carries the tags ``git_commit``, ``data_version`` (the DVC md5 of the dataset), ``dataset``,
``label_fraction`` and ``network`` (:class:`LineageTags`, made from the facts :mod:`cass.lineage` reads);
fine-tuning and evaluation runs also ``pretraining_run_id``. Runs are named by what sets them apart
(:func:`run_label`): the dataset and its version, the label fraction, the settings changed from the settings
file and the start time, e.g. ``demo@0123abcd lf=0.1 finetune.lr=0.0005 11-30 16:40``; a stage run puts its
stage first (``finetune-cnn demo@0123abcd ...``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cass.config import Params
from cass.outputs import EvaluateOutputs, FinetuneOutputs, Layout
from cass.tracking.redact import loggable_params, redact

RUN_LABEL_TAG = "run_label"
"""The tag of a pipeline's parent run that holds its label; its stage runs are named after it."""
SHOWN_CHANGES = 3  # changed settings named in a run's label; more are counted ("+2 more")
# In the label already; tune.pin lists the keys a --set gave, which the label names with their values.
_NAMED_ELSEWHERE = ("data.", "finetune.label_fraction", "split.label_fractions", "tune.pin")


def run_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """``tags`` plus MLflow's own context tags (source, user, git), all redacted.

    MLflow records the git remote URL by itself; a remote with an embedded token would otherwise leak.
    """
    from mlflow.tracking.context.registry import resolve_tags

    resolved = resolve_tags({k: str(v) for k, v in tags.items() if v is not None})
    return {k: redact(str(v)) for k, v in resolved.items()}


# --------------------------------------------------------------------------------------------------
# Lineage tags


@dataclass
class LineageTags:
    """The lineage tags every run of one pipeline carries (from :mod:`cass.lineage`'s commit and data version)."""

    dataset: str
    label_fraction: float
    git_commit: str = ""
    data_version: str = ""
    test_set: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def tags(self, network: str, **more: str | None) -> dict[str, str]:
        tags = {
            "dataset": self.dataset,
            "label_fraction": f"{self.label_fraction:g}",
            "git_commit": self.git_commit or "unknown",
            "data_version": self.data_version or "untracked",
            "network": network,
            **({"test_set": self.test_set} if self.test_set else {}),
            **self.extra,
        }
        tags.update({k: v for k, v in more.items() if v})
        return tags


def data_digest(data_dir: Path, data_version: str = "") -> str:
    """The digest of the dataset input of a run: the DVC md5 of the data when DVC tracks it, else the
    content hash of the prepared manifest (every file's sha256, label and split), shortened as MLflow
    stores digests (36 characters)."""
    if data_version:
        return data_version[:36]
    from cass.run_keys import data_hash

    return data_hash(Path(data_dir))[:32]


def changed_settings(params: Params, base: Params | None) -> dict[str, str]:
    """The result-changing settings (:func:`cass.run_keys.result_settings`) in which ``params`` differs
    from ``base`` (the settings file without overrides), as ``section.key`` -> value; the data and the
    label fraction are named apart, where a run goes (MLflow, retries, workers) is not named."""
    from cass.run_keys import result_settings

    if base is None:
        return {}
    keys = set(result_settings(params, tuning=True))
    now, before = loggable_params(params), loggable_params(base)
    return {k: v for k, v in now.items()
            if k in keys and before.get(k) != v and not k.startswith(_NAMED_ELSEWHERE)}


def run_label(
    params: Params, digest: str, changed: Mapping[str, str] | None = None, when: datetime | None = None
) -> str:
    """What sets a run apart from the others of its experiment: ``<dataset>@<data version> lf=<label
    fraction>``, the changed settings (the first :data:`SHOWN_CHANGES`) and the start time (minutes)."""
    parts = [f"{params.data.name}@{digest[:8] or 'untracked'}", f"lf={params.finetune.label_fraction:g}"]
    items = list((changed or {}).items())
    parts += [f"{key}={value}" for key, value in items[:SHOWN_CHANGES]]
    if len(items) > SHOWN_CHANGES:
        parts.append(f"+{len(items) - SHOWN_CHANGES} more")
    parts.append((when or datetime.now()).strftime("%m-%d %H:%M"))
    return " ".join(parts)


def label_of(params: Params, data_dir: Path, data_version: str = "", *, base: Params | None = None,
             parent_run_id: str | None = None) -> str:
    """The :func:`run_label` a run is named after, wherever it runs: its pipeline's (the parent run's tag)
    for a stage of one, else the dataset on disk at ``data_version`` and the settings that differ from
    ``base`` (``cass register``, ``cass tune``, the runs of ``dvc repro``'s outputs)."""
    if parent_run_id:
        import mlflow

        label = mlflow.MlflowClient().get_run(parent_run_id).data.tags.get(RUN_LABEL_TAG, "")
        if label:
            return label
    return run_label(params, data_digest(data_dir, data_version), changed_settings(params, base))


def run_name(stage: str, label: str) -> str:
    """``<stage> <label>``: the stage first, so a search or the compare view tells the runs of one label apart."""
    return " ".join(filter(None, (stage, label)))


def test_set_hash(data_dir: Path) -> str:
    """Identifies the exact test split (paths, file hashes, labels): champions are compared only on one."""
    from cass.data.manifest import read_manifest

    df, _ = read_manifest(Path(data_dir))
    test = df[df["split"] == "test"].sort_values("path")
    rows = zip(test["path"], test["sha256"], test["labels"], strict=True)
    lines = "\n".join(f"{path}\t{sha}\t{labels}" for path, sha, labels in rows)
    return hashlib.sha256(lines.encode()).hexdigest()


def pipeline_lineage(params: Params, data_dir: Path) -> LineageTags:
    """The lineage tags of a pipeline on prepared data: commit, DVC data version, test-split hash."""
    from cass.data.manifest import read_manifest
    from cass.lineage import data_version, git_commit

    _, info = read_manifest(Path(data_dir))
    return LineageTags(
        params.data.name,
        params.finetune.label_fraction,
        info.git_commit or git_commit(),
        info.data_version or data_version(params.data.root),
        test_set_hash(data_dir),
    )


def read_lineage(path: Path, stage: str) -> dict[str, Any]:
    """A stage's lineage.json; a :class:`TrainingError` naming the file and the command that writes it."""
    from cass.errors import TrainingError

    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TrainingError(f"{path}: not found; it is written by `cass {stage}` (outputs of an older version "
                            f"have none): rerun `cass {stage}` or `dvc repro`") from None
    except ValueError as exc:
        raise TrainingError(f"{path}: not valid JSON ({exc}); rerun `cass {stage}`") from None
    if not isinstance(doc, dict):
        raise TrainingError(f"{path}: expected a JSON object; rerun `cass {stage}`")
    return doc


def model_lineage(layout: Layout, network: str) -> tuple[LineageTags, dict[str, Any]]:
    """The lineage tags of the fine-tuned ``network`` on disk, from the lineage.json beside its weights
    (the commit, data and settings it was trained with, never the current params.yaml), and that record.

    Refuses an evaluation of other weights than those on disk: its metrics would describe another model.
    """
    from cass.engine import file_digest
    from cass.errors import TrainingError

    ft = FinetuneOutputs(layout.finetune(network))
    record = read_lineage(ft.lineage, "finetune")
    evaluated = read_lineage(EvaluateOutputs(layout.evaluate(network)).lineage, "evaluate")
    weights = file_digest(ft.weights)
    if record.get("weights_sha256") != weights or evaluated.get("model_sha256") != weights:
        raise TrainingError(f"{ft.weights} is not the model {layout.evaluate(network)} and {ft.lineage} describe "
                            f"(weights changed since); rerun `cass evaluate --network {network}` or `dvc repro`")
    tuning = record.get("tuning") or {}
    pretraining = record.get("pretraining") or {}
    extra = {
        "arch": str(record.get("arch", "")),
        "model_sha256": weights,
        "evaluation_commit": str(evaluated.get("git_commit", "")),
        **({"tuned_params": ",".join(tuning.get("in_effect", [])), "tuned_from": str(tuning.get("file", ""))}
           if tuning else {}),
        **({"pretraining_weights_sha256": str(pretraining["weights_sha256"])}
           if pretraining.get("weights_sha256") else {}),
    }
    lineage = LineageTags(str(record.get("dataset", "")), float(record.get("label_fraction", 0.0)),
                      str(record.get("git_commit", "")), str(record.get("data_version", "")),
                      test_set_hash(layout.data), {k: v for k, v in extra.items() if v})
    return lineage, record


def networks_tag(params: Params) -> str:
    return "+".join(params.finetune.networks)
