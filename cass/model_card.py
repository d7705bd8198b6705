"""A model card for every registered version: what the model is, what it was trained and tested on, how
honest its probabilities are, where it looks, whom it serves worse, and what it is for.

Everything in the card comes from the records of the version it describes, not from the settings or
files on the machine that registers it: the version's lineage tags, its evaluation run (metrics, the
``evaluation/`` files: class counts, reliability table and diagram, explanation panel, subgroup table, and
the flat settings it ran with), its fine-tuning and pretraining runs (labelled images, the collapse
indicator) and the version's one gate verdict as registration recorded it (cass.quality.policy: the
``model_gate`` tag and the card render the same record). Only the intended use and the limitations are the user's text
(``card:`` in params.yaml, or a markdown file), with placeholders filled in.

The card is written as markdown and as a self-contained HTML page (inline CSS, figures embedded as data
URIs, no script and no link to fetch) that a browser renders with no network, as hospital sites run.
Both are logged beside the model's files (``model_card/`` in the logged model's artifacts), the version
gets a ``model_card`` tag with their location, and its description (shown on the registry page) ends with
a short summary of the card.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from cass.config import Params
from cass.names import SCORE_METRICS

log = logging.getLogger(__name__)

CARD_DIR = "model_card"
CARD_MD = "model_card.md"
CARD_HTML = "model_card.html"
CARD_TAG = "model_card"
FIGURES = {
    "reliability.png": "Reliability diagram on the test split, before and after temperature scaling",
    "explanations.png": "Heat maps of a seeded sample of test images per class",
    "confusion_matrix.png": "Confusion matrix on the test split",
}
# Settings that do not change what the model is (where runs are logged, how the flow retries, the card's text).
_NOT_A_SETTING = ("mlflow.", "retrain.", "card.", "tune.space")


@dataclass
class CardFacts:
    """What the card says, gathered from the records of one registered version."""

    name: str
    version: str
    network: str
    tags: Mapping[str, str]
    metrics: Mapping[str, Any]
    settings: Mapping[str, str] = field(default_factory=dict)
    changed: list[tuple[str, str, str]] = field(default_factory=list)  # (key, value, default)
    class_counts: pd.DataFrame | None = None
    subgroups: pd.DataFrame | None = None
    reliability: pd.DataFrame | None = None
    pretraining: Mapping[str, Any] = field(default_factory=dict)
    finetuning: Mapping[str, Any] = field(default_factory=dict)
    gate: Mapping[str, Any] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    data_change: str = ""  # the data-change report against the champion's data (cass.data_change), markdown
    intended_use: str = ""
    limitations: str = ""
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


# --------------------------------------------------------------------------------------------------
# Gathering


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if _finite(v) else "n/a"


def _download(run_id: str | None, path: str, dst: Path) -> Path | None:
    """An artifact of a run, or None when the run or the file is not there (an older or partial record)."""
    if not run_id:
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))
    except (MlflowException, OSError) as exc:
        log.info("model card: %s of run %s not available (%s)", path, run_id, str(exc)[:200])
        return None


def _run(client, run_id: str | None):
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def changed_settings(settings: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(key, value, default) for each logged setting whose value differs from the schema's default.

    Defaults are written as MLflow params are (lists and mappings as JSON, the rest as ``str``)."""
    from cass.config import params_to_flat_dict

    defaults = {k: json.dumps(v) if isinstance(v, list | dict) else str(v)
                for k, v in params_to_flat_dict(Params()).items() if not k.startswith(_NOT_A_SETTING)}
    return [(k, v, defaults.get(k, "(none)")) for k, v in sorted(settings.items())
            if not k.startswith(_NOT_A_SETTING) and defaults.get(k) != v]


def _read_csv(path: Path | None, text_columns: tuple[str, ...] = ()) -> pd.DataFrame | None:
    """A table of the evaluation; ``text_columns`` keep values such as "NA" or "None" as written (group names),
    the other columns are numbers where they can be (an empty cell is NaN)."""
    if path is None or not path.is_file():
        return None
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)

    def column(values: pd.Series) -> pd.Series:
        if values.name in text_columns:
            return values
        if set(values) <= {"True", "False"}:
            return values == "True"
        try:
            return pd.to_numeric(values.replace("", math.nan))
        except (TypeError, ValueError):
            return values

    return raw.apply(column)


def _gate(params: Params, candidate, tmp: Path) -> dict:
    """The version's one gate verdict (cass.quality.policy), as registration recorded it: the verdict the
    candidate carries; for a caller that passed none, the pipeline's gate result, else the gate run now."""
    from cass.quality.policy import GateVerdict

    if candidate.gate is not None:
        return candidate.gate.record()
    tags, network = candidate.tags, candidate.network
    found = _download(tags.get("pipeline_run_id"), f"data_quality/model/{network}/result.json", tmp / "gate")
    if found is not None and found.is_file():
        source = f"pipeline run {tags.get('pipeline_run_id')}"
        return GateVerdict.from_result(json.loads(found.read_text()), params.quality, source).record()
    from cass.quality import validate_model

    path = tmp / "gate-metrics.json"
    path.write_text(json.dumps(dict(candidate.metrics)))
    result = validate_model(params, path, tmp / "gate-now", raise_on_failure=False).to_dict()
    return GateVerdict.from_result(result, params.quality, "run at registration on the version's test metrics").record()


def _fill(text: str, values: Mapping[str, str]) -> str:
    """``{placeholder}`` filled in from ``values``; unknown ones stay as written."""
    return re.sub(r"\{(\w+)\}", lambda m: str(values.get(m.group(1), m.group(0))), text)


def user_text(params: Params, values: Mapping[str, str]) -> tuple[str, str]:
    """(intended use, limitations) from ``card:``; with ``card.file`` its text is both sections."""
    from cass.errors import ConfigError

    card = params.card
    if card.file:
        path = Path(card.file)
        if not path.is_file():
            raise ConfigError(f"card.file {path}: not found (relative to the working directory)")
        return _fill(path.read_text(), values), ""
    return _fill(card.intended_use, values), _fill(card.limitations, values)


def gather(params: Params, candidate, name: str, version: str, client, tmp: Path) -> CardFacts:
    """The facts of version ``version`` of ``name`` from its tags and the runs they name."""
    tags = dict(candidate.tags)
    evaluation = tags.get("evaluation_run_id")
    folder = _download(evaluation, "evaluation", tmp / "evaluation")
    folder = folder if folder is not None and folder.is_dir() else None
    eval_run = _run(client, evaluation)
    settings = dict(eval_run.data.params) if eval_run else {}
    facts = CardFacts(name=name, version=str(version), network=candidate.network, tags=tags,
                      metrics=dict(candidate.metrics), settings=settings, changed=changed_settings(settings))
    if folder is not None:
        facts.class_counts = _read_csv(folder / "class_counts.csv", ("class",))
        facts.subgroups = _read_csv(folder / "subgroups.csv", ("column", "group"))
        facts.reliability = _read_csv(folder / "reliability.csv")
        facts.figures = {f: folder / f for f in FIGURES if (folder / f).is_file()}
    _data_change(facts, client, evaluation, tmp)
    pre = _run(client, tags.get("pretraining_run_id"))
    if pre is not None:
        facts.pretraining = {"run_id": pre.info.run_id, "method": pre.data.params.get("pretrain.method", "cass"),
                             **pre.data.metrics, **recipe_of(_download(pre.info.run_id, "networks.json", tmp / "pre"))}
    ft = _run(client, tags.get("finetune_run_id"))
    if ft is not None:
        facts.finetuning = {"run_id": ft.info.run_id, **ft.data.metrics}
    facts.gate = _gate(params, candidate, tmp)
    classes = list(facts.metrics.get("per_class") or {})
    values = {"dataset": tags.get("dataset", params.data.name), "classes": ", ".join(classes), "model": name,
              "version": str(version), "network": candidate.network, "data_version": tags.get("data_version", "?")}
    facts.intended_use, facts.limitations = user_text(params, values)
    return facts


def recipe_of(networks_json: Path | None) -> dict[str, str]:
    """The pretraining recipe as networks.json records it (the variant, its anti-collapse term) and why that
    recipe (``variant_reason``: the settings, or a ``cass study`` recommendation for ``pretrain.variant: auto``)."""
    if networks_json is None or not networks_json.is_file():
        return {}
    spec = json.loads(networks_json.read_text())
    if spec.get("method", "cass") != "cass" or "variant" not in spec:
        return {}
    anti = spec.get("anti_collapse", "none")
    recipe = spec["variant"] + (f" + {anti}" if anti not in ("none", None) else "")
    if spec.get("augment_recipe") not in (None, "paper"):
        recipe += f", {spec['augment_recipe']} views"
    return {"recipe": recipe, **({"recipe_reason": spec["variant_reason"]} if spec.get("variant_reason") else {})}


def _data_change(facts: CardFacts, client, evaluation: str | None, tmp: Path) -> None:
    """The data-change report the run logged to the evaluation run before registering, when it wrote one (a
    first version, or one trained on its champion's data, has none: that is no missing record to log)."""
    from mlflow.exceptions import MlflowException

    from cass.outputs import DATA_CHANGE_DIR, DATA_CHANGE_FIGURE, DATA_CHANGE_MD

    try:
        written = bool(evaluation) and bool(client.list_artifacts(evaluation, DATA_CHANGE_DIR))
    except MlflowException:
        written = True  # let the download below say what is wrong
    if not written:
        return
    folder = _download(evaluation, DATA_CHANGE_DIR, tmp / "data_change")
    if folder is None or not (folder / DATA_CHANGE_MD).is_file():
        return
    lines = (folder / DATA_CHANGE_MD).read_text().splitlines()
    body = [("#" + line if line.startswith("## ") else line) for line in lines if not line.startswith("# ")]
    facts.data_change = "\n".join(body).strip()
    if (folder / DATA_CHANGE_FIGURE).is_file():
        facts.figures[DATA_CHANGE_FIGURE] = folder / DATA_CHANGE_FIGURE


# --------------------------------------------------------------------------------------------------
# Rendering


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _headline(f: CardFacts) -> str:
    m = f.metrics
    parts = [f"test macro F1 {_fmt(m.get('macro_f1'))}", f"balanced accuracy {_fmt(m.get('balanced_accuracy'))}",
             f"ECE {_fmt(m.get('ece'))} (before temperature scaling {_fmt(m.get('ece_before_scaling'))})"]
    if _finite(m.get("subgroup_gap")):
        parts.append(f"worst-subgroup gap {_fmt(m.get('subgroup_gap'))}")
    parts.append(f"model gate {_gate_word(f.gate)}")
    return ", ".join(parts)


def _gate_word(gate: Mapping[str, Any]) -> str:
    if "passed" not in gate:
        return "not recorded"
    if not gate["passed"]:
        return "FAILED"
    return "passed" if gate.get("promotable", True) else "passed only under lowered thresholds (not promotable)"


def _gate_section(gate: Mapping[str, Any]) -> list[str]:
    """The verdict as recorded on the version, the thresholds it was judged by and, where the run's differed
    from the committed policy's, both side by side with the policy's verdict."""
    if "passed" not in gate:
        return ["No model gate verdict was recorded.", ""]
    policy = gate.get("policy") or {}
    out = [f"Verdict: **{gate.get('verdict') or _gate_word(gate)}** ({gate.get('checks', 0)} checks; thresholds "
           f"from {gate.get('source') or 'unknown'}).", ""]
    thresholds, committed = gate.get("thresholds") or {}, policy.get("thresholds") or {}
    if thresholds:
        keys = sorted(set(thresholds) | set(committed))
        header = ["setting", "judged by"] + ([f"committed policy ({policy.get('source')})"] if policy else [])
        rows = [[f"quality.{k}", json.dumps(thresholds.get(k))] + ([json.dumps(committed.get(k))] if policy else [])
                for k in keys]
        out += [_table(header, rows), ""]
    if policy:
        out += [f"Under the committed policy: {'passed' if policy.get('passed') else 'FAILED'}.", ""]
    for kind in ("failures", "warnings"):
        for finding in gate.get(kind, []):
            out.append(f"- {kind[:-1]}: {finding}")
    for finding in policy.get("failures", []):
        out.append(f"- failure under the committed policy: {finding}")
    return out


def _collapse(pre: Mapping[str, Any]) -> str:
    if not pre:
        return "not recorded (no pretraining run)"
    collapsed = pre.get("collapsed")
    stds = [f"{n.upper()} embedding std {_fmt(pre.get(f'{n}_embedding_std'), 4)}" for n in ("cnn", "vit")
            if _finite(pre.get(f"{n}_embedding_std"))]
    healthy = pre.get("healthy_embedding_std")
    verdict = "collapsed" if collapsed == 1.0 else "not collapsed" if collapsed == 0.0 else "not recorded"
    detail = ", ".join(stds) + (f" (healthy {_fmt(healthy, 4)})" if _finite(healthy) else "")
    return f"{verdict}" + (f": {detail}" if detail else "")


def to_markdown(f: CardFacts) -> str:
    """The card as markdown; figures are referenced by file name (they sit beside it)."""
    t, m = f.tags, f.metrics
    out = [f"# Model card: {f.name} version {f.version}", "",
           f"*Generated {f.created} by cass from the records of this version.*", "",
           f"**Summary:** {_headline(f)}.", ""]

    out += ["## Model", "", _table(["", "value"], [
        ("registered model", f"{f.name} v{f.version}"),
        ("network", f"{f.network} ({m.get('arch') or t.get('arch', '?')})"),
        ("input", "a column `image` of encoded image bytes (PNG, JPEG, TIFF, ...)"),
        ("output", "one probability per class" + ("; `labels`: the classes over their thresholds"
                                                  if "exact_match" in m else "")),
        ("temperature (applied to the logits)", _fmt(m.get("temperature"), 4)),
        ("logged model", t.get("model_id", "?")),
    ]), ""]

    lineage = [
        ("dataset", t.get("dataset", "?")), ("data version (DVC md5)", t.get("data_version", "untracked")),
        ("label fraction", t.get("label_fraction", "?")),
        ("labelled training images", _fmt(f.finetuning.get("labelled_images"), 0)),
        ("test set hash", t.get("test_set", "?")), ("git commit", t.get("git_commit", "unknown")),
        ("pipeline run", t.get("pipeline_run_id", "none")), ("pretraining run", t.get("pretraining_run_id", "none")),
        ("fine-tuning run", t.get("finetune_run_id", "?")), ("evaluation run", t.get("evaluation_run_id", "?")),
    ]
    out += ["## Lineage", "", _table(["", "value"], lineage), ""]

    out += ["## Data", ""]
    if f.class_counts is not None:
        counts = f.class_counts
        out += ["Images per class and split:", "", _table(list(counts.columns), counts.to_numpy().tolist()), ""]
    else:
        out += ["Class counts were not recorded with this version's evaluation.", ""]

    init = f.settings.get("finetune.init", "?")
    method = f.pretraining.get("method", "none") if init == "cass" else "none"
    out += ["## Training", "", _table(["", "value"], [
        ("start", {"cass": "self-supervised pretraining", "random": "random initialisation",
                   "weights": "given weights (model.*_weights)"}.get(init, init)),
        ("pretraining method", method),
        *((("pretraining recipe", f.pretraining["recipe"]),) if init == "cass" and "recipe" in f.pretraining else ()),
        *((("why this recipe", f.pretraining["recipe_reason"]),)
          if init == "cass" and "recipe_reason" in f.pretraining else ()),
        ("pretraining collapse indicator", _collapse(f.pretraining) if init == "cass" else "no pretraining"),
        ("fine-tuning epochs (best)", f"{_fmt(f.finetuning.get('epochs_run'), 0)} "
                                      f"({_fmt(f.finetuning.get('best_epoch'), 0)})"),
        ("best validation macro F1", _fmt(f.finetuning.get("best_val_macro_f1"))),
    ]), ""]
    if f.changed:
        out += ["Settings that differ from the defaults of `cass/config.py`:", "",
                _table(["setting", "value", "default"], f.changed), ""]

    out += ["## Test metrics", "", _table(["metric", "value"], [
        (k.replace("_", " "), _fmt(m.get(k))) for k in
        SCORE_METRICS if k in m
    ] + [("test images", m.get("num_samples", "?"))]), ""]
    per_class = m.get("per_class") or {}
    if per_class:
        rows = [(c, _fmt(s.get("precision")), _fmt(s.get("recall")), _fmt(s.get("f1")), _fmt(s.get("auroc")),
                 s.get("support", "?")) for c, s in per_class.items()]
        out += [_table(["class", "precision", "recall", "F1", "AUROC", "support"], rows), ""]

    out += ["## Calibration", "",
            f"Expected calibration error on the test split: **{_fmt(m.get('ece'))}** with the temperature "
            f"{_fmt(m.get('temperature'), 3)} fitted on the validation split, {_fmt(m.get('ece_before_scaling'))} "
            "without it. The served model applies the temperature.", ""]
    thresholds = {c: s["threshold"] for c, s in per_class.items() if isinstance(s, dict) and "threshold" in s}
    if thresholds:
        out += ["Per-label decision thresholds (chosen on validation): "
                + ", ".join(f"{c} {v:.2f}" for c, v in thresholds.items()), ""]
    if "reliability.png" in f.figures:
        out += [f"![{FIGURES['reliability.png']}](reliability.png)", ""]
    if f.reliability is not None:
        scaled = f.reliability[f.reliability["scaling"] != "raw"]
        rows = [(f"{r.lower:.2f}-{r.upper:.2f}", int(r.count), _fmt(r.confidence), _fmt(r.accuracy))
                for r in scaled.itertuples() if int(r.count) > 0]
        out += ["Per-bin table after scaling (bins with images):", "",
                _table(["confidence bin", "images", "mean confidence", "accuracy"], rows), ""]

    out += ["## Subgroups", ""]
    if f.subgroups is not None:
        rows = [(r.column, r.group, int(r.images), _fmt(r.macro_f1), _fmt(r.balanced_accuracy),
                 "yes" if r.counted else "no") for r in f.subgroups.itertuples()]
        out += ["Worst-subgroup gap (largest shortfall below the whole test split): "
                f"**{_fmt(m.get('subgroup_gap'))}** (macro F1 {_fmt(m.get('subgroup_gap_macro_f1'))}, "
                f"balanced accuracy {_fmt(m.get('subgroup_gap_balanced_accuracy'))}).", "",
                _table(["column", "group", "test images", "macro F1", "balanced accuracy", "in the gap"], rows), ""]
    else:
        out += ["No subgroup columns were given (`data.group_columns`), so no subgroup was measured.", ""]

    out += ["## Explanations", ""]
    if "explanations.png" in f.figures:
        out += ["Heat maps of the evidence for the predicted class on a fixed, seeded sample of test images "
                "(CNN: Grad-CAM on the last convolutional stage; ViT: `evaluate.vit_explainer`). "
                "`cass explain --model models:/<name>@champion IMAGE...` draws them for any image.", "",
                f"![{FIGURES['explanations.png']}](explanations.png)", ""]
    else:
        out += ["No explanation panel was recorded (`evaluate.explain_per_class: 0`).", ""]

    out += ["## Model gate", "", *_gate_section(f.gate)]
    if f.data_change:
        out += ["", "## Data change since the champion", "", f.data_change]
    out += ["", "## Intended use", "", f.intended_use.strip(), ""]
    if f.limitations:
        out += ["## Limitations", "", f.limitations.strip(), ""]
    return "\n".join(out).rstrip() + "\n"


_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:60rem;margin:2rem auto;
padding:0 1rem;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6rem;border-bottom:2px solid #2d6a9f;padding-bottom:.3rem}
h2{font-size:1.2rem;margin-top:1.8rem;color:#2d6a9f}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #c9ced6;padding:.25rem .55rem;text-align:left;vertical-align:top}
th{background:#eef2f7} code{background:#f3f3f3;padding:0 .2rem} img{max-width:100%;border:1px solid #ddd}
"""


def to_html(markdown_text: str, figures: Mapping[str, Path], title: str) -> str:
    """A self-contained page: the markdown rendered, the CSS inline, each figure embedded as a data URI."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"], output_format="html")

    def embed(match: re.Match) -> str:
        name = html.unescape(match.group(1))
        path = figures.get(name)
        if path is None or not Path(path).is_file():
            return match.group(0)
        data = base64.b64encode(Path(path).read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"]+)"', embed, body)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")


def summary(f: CardFacts, location: str) -> str:
    """The few lines the registry page shows in the version's description."""
    worst = ""
    if f.subgroups is not None:
        from cass.subgroups import worst_group

        row = worst_group(f.subgroups)
        if row is not None:
            worst = (f" Worst subgroup: {row['column']}={row['group']} (balanced accuracy "
                     f"{_fmt(row['balanced_accuracy'])}).")
    return (f"**Model card** ({location}/{CARD_HTML}, markdown beside it): {_headline(f)}.{worst} "
            f"Pretraining: {f.pretraining.get('method', 'none')}, collapse indicator "
            f"{_collapse(f.pretraining) if f.pretraining else 'n/a'}. Download: "
            f"`mlflow artifacts download -u {location}`.")


def write(f: CardFacts, out_dir: Path) -> Path:
    """The card (markdown, HTML) and its figures in ``out_dir``; returns the folder."""
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    text = to_markdown(f)
    (out_dir / CARD_MD).write_text(text)
    (out_dir / CARD_HTML).write_text(to_html(text, f.figures, f"{f.name} v{f.version}"))
    for name, path in f.figures.items():
        shutil.copy2(path, out_dir / name)
    return out_dir


def logged_model_id(mv) -> str | None:
    """The MLflow 3 logged model behind a version (its ``model_id``, or the id in a ``models:/m-...`` source)."""
    model_id = getattr(mv, "model_id", None)
    if model_id:
        return str(model_id)
    match = re.fullmatch(r"models:/(m-[0-9a-f]+)/?", str(mv.source or ""))
    return match.group(1) if match else None


def attach(params: Params, candidate, name: str, version: str, client, description: str = "") -> str:
    """Build the card of version ``version``, log it beside the model's files, tag the version and append the
    card's summary to ``description`` (the version's description); returns the card folder's URI."""
    mv = client.get_model_version(name, version)
    model_id = logged_model_id(mv)
    with tempfile.TemporaryDirectory(prefix="cass-card-") as tmp:
        facts = gather(params, candidate, name, version, client, Path(tmp))
        if model_id:
            facts.tags = {**facts.tags, "model_id": model_id}
        folder = write(facts, Path(tmp) / CARD_DIR)
        if model_id:
            client.log_model_artifacts(model_id, str(folder), CARD_DIR)
            location = f"{client.get_logged_model(model_id).artifact_location.rstrip('/')}/{CARD_DIR}"
        else:  # a version registered from a run's files: the card goes to its evaluation run
            run_id = candidate.tags.get("evaluation_run_id") or mv.run_id
            client.log_artifacts(run_id, str(folder), CARD_DIR)
            location = f"runs:/{run_id}/{CARD_DIR}"
        client.set_model_version_tag(name, version, CARD_TAG, f"{location}/{CARD_HTML}")
        text = f"{description}\n\n{summary(facts, location)}" if description else summary(facts, location)
        client.update_model_version(name, version, description=text)
    log.info("model card of %s v%s: %s", name, version, location)
    return location
