"""``dvc.yaml``, generated from the stage list and the settings, so that DVC runs the pipeline the flow runs.

The stages of ``dvc.yaml`` are those of :data:`cass.pipeline.STAGES` that name a DVC stage (``Stage.dvc``),
chosen by the same rules: ``pretrain`` only when ``finetune.init`` is ``cass``, ``tune`` only when
``tune.enabled`` (and then ``finetune`` applies ``best_<network>.yaml``), one ``foreach`` item per
network of ``finetune.networks``. What each DVC stage runs, reads, writes and tracks (its command,
dependencies on data and code, params sections, outputs, metrics and plots) is declared here.

``cass dvc-yaml`` (re)writes the file; ``cass dvc-yaml --check`` says whether it is current. A training
command that DVC runs (``DVC_STAGE`` is set) refuses to start under a ``dvc.yaml`` that is stale for
``params.yaml``, naming the command that rewrites it (:func:`refuse_stale`).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from cass.config import Params
from cass.errors import ConfigError

DVC_YAML = "dvc.yaml"
COMMAND = "cass dvc-yaml"

_CODE_DATA = ("cass/data/dataset.py", "cass/data/transforms.py", "cass/data/images.py", "cass/data/manifest.py")
_PREPARED = ("${data.root}", "outputs/data/manifest.csv", "outputs/data/dataset.json")


@dataclass(frozen=True)
class DvcStage:
    """One stage of ``dvc.yaml``. ``per_network`` stages run ``foreach`` network (``${item}``); an entry of a
    list may end with ``  # comment``, kept in the file. ``note``: comment lines above the command."""

    name: str
    desc: str
    cmd: str
    deps: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple[str, ...]
    metrics: tuple[str, ...] = ()
    per_network: bool = False
    note: str = ""
    after: str = ""  # comment lines after the stage


@dataclass(frozen=True)
class Plan:
    """What decides the shape of ``dvc.yaml``: the networks, and the DVC stages of :data:`cass.pipeline.STAGES`
    that the settings run (by the stages' own ``when`` rules)."""

    networks: tuple[str, ...]
    names: tuple[str, ...]

    @classmethod
    def of(cls, params: Params) -> Plan:
        from cass.pipeline import PipelineRun, plan
        from cass.stages import tunes

        run = PipelineRun(params, tuning=tunes(params))  # untracked: DVC runs no MLflow step
        return cls(tuple(params.finetune.networks), tuple(stage.dvc for stage in plan(run) if stage.dvc))

    @property
    def pretrain(self) -> bool:
        return "pretrain" in self.names

    @property
    def tune(self) -> bool:
        return "tune" in self.names

    def stages(self) -> list[DvcStage]:
        declared = {stage.name: stage for stage in _declarations(self)}
        return [declared[name] for name in self.names]


# The settings code every stage reads: Params, its sections and the metric and check names they validate against.
_CONFIG = ("cass/config.py", "cass/config_base.py", "cass/config_data.py", "cass/config_training.py",
           "cass/config_tuning.py", "cass/config_tracking.py", "cass/config_study.py", "cass/names.py")


def _declarations(p: Plan) -> list[DvcStage]:
    pretrained = ("outputs/pretrain/${item}.safetensors", "outputs/pretrain/networks.json") if p.pretrain else ()
    best = ("outputs/tune/best_${item}.yaml",) if p.tune else ()
    return [
        DvcStage(
            "prepare", "Manifest (hash, size and mode of every image), seeded splits, label-fraction subsets.",
            "cass data prepare",
            ("${data.root}", "cass/data/prepare.py", "cass/data/layouts.py", "cass/data/adapters.py",
             "cass/data/problems.py", "cass/data/fingerprint.py", "cass/data/manifest.py", "cass/data/images.py",
             "cass/data/splits.py", "cass/lineage.py", *_CONFIG),
            ("data", "split"), ("outputs/data",),
        ),
        DvcStage(
            "validate_data",
            "Data-quality gates (Great Expectations) - a failed check stops `dvc repro` here, before training.",
            "cass validate manifest && cass validate splits",
            ("${data.root}", "outputs/data", "cass/quality", "cass/data/fingerprint.py"),
            ("quality", "data", "split.label_fractions"), ("outputs/quality/manifest", "outputs/quality/splits"),
            after=("Training depends on the gates' result.json (no timestamps inside), so it reruns only when a\n"
                   "verdict changes, and never starts when a gate failed."),
        ),
        DvcStage(
            "pretrain", "CASS self-supervised pretraining of the CNN and the ViT together, without labels.",
            "cass pretrain && rm -f outputs/pretrain/checkpoint.pt",
            ("outputs/quality/manifest/result.json", "outputs/quality/splits/result.json", *_PREPARED,
             "cass/stages.py", "cass/tracker.py", "cass/cass_pretraining.py", "cass/pretraining_common.py",
             "cass/ema.py", "cass/variants.py", "cass/monitor.py", "cass/baselines/dino.py", "cass/engine.py",
             "cass/training.py", "cass/distributed.py", "cass/models.py", "cass/losses", *_CODE_DATA, "cass/lineage.py",
             *_CONFIG),
            ("seed", "data.max_image_pixels", "model", "augment", "pretrain"),
            ("outputs/pretrain/cnn.safetensors", "outputs/pretrain/vit.safetensors", "outputs/pretrain/networks.json",
             "outputs/pretrain/history.csv",
             "# Loss and speed summaries beside the recipe, device and lineage: an output, not a DVC metrics file",
             "# (its curves are in `dvc plots`).",
             "outputs/pretrain/metrics.json"),
            note=(
                "checkpoint.pt is deliberately not an output: DVC leaves it alone, so a pretraining interrupted\n"
                "during `dvc repro` resumes from its last epoch on the next `dvc repro` (cass pretrain resumes when\n"
                "the checkpoint's settings and data match). It is removed once the stage has finished, so a rerun\n"
                "caused by changed code starts from scratch instead of \"resuming\" a finished run."
            ),
        ),
        DvcStage(
            "tune", "Optuna search of the fine-tuning settings of the ${item}; the best ones feed finetune@${item}.",
            "cass tune --network ${item}",
            (*_PREPARED, "outputs/data/subsets", "outputs/quality/splits/result.json", *pretrained, "cass/stages.py",
             "cass/tracker.py", "cass/tuning", "cass/finetune.py", "cass/engine.py", "cass/tracking"),
            ("seed", "data.max_image_pixels", "model", "augment", "finetune", "evaluate", "tune"),
            ("outputs/tune/best_${item}.yaml", "outputs/tune/optuna_${item}.db"),
            per_network=True,
            note="The study and its trials are logged to MLflow (the mlflow: settings); the study resumes from its\n"
                 "database when the stage is interrupted.",
        ),
        DvcStage(
            "finetune", "Supervised fine-tuning of the ${item} on the finetune.label_fraction subset (focal loss)"
            + ("; the settings tune@${item} found replace params.yaml's." if p.tune else "."),
            "cass finetune --network ${item}" + (" --best-params outputs/tune/best_${item}.yaml" if p.tune else ""),
            (*best, "outputs/quality/splits/result.json", *_PREPARED, "outputs/data/subsets", *pretrained,
             "cass/stages.py", "cass/tracker.py", "cass/tuning/best_params.py", "cass/finetune.py",
             "cass/classifier.py", "cass/calibration.py", "cass/engine.py", "cass/training.py", "cass/distributed.py",
             "cass/models.py", "cass/losses/focal.py", "cass/metrics.py", *_CODE_DATA, "cass/data/splits.py",
             "cass/lineage.py", *_CONFIG),
            ("seed", "data.max_image_pixels", "model", "augment", "finetune", "evaluate"),
            ("outputs/finetune/${item}/model.safetensors", "outputs/finetune/${item}/model.json",
             "outputs/finetune/${item}/history.csv", "outputs/finetune/${item}/lineage.json"),
            ("outputs/finetune/${item}/metrics.json",), per_network=True,
            note="It resumes its undeclared checkpoint.pt after an interruption, as pretraining does; cass finetune\n"
                 "removes the checkpoint once its outputs are written.",
        ),
        DvcStage(
            "evaluate", "Test-split metrics, confusion matrix, ROC curves, calibration, explanations and subgroup "
            "metrics of the fine-tuned ${item}.",
            "cass evaluate --network ${item}",
            (*_PREPARED, "outputs/finetune/${item}/model.safetensors", "outputs/finetune/${item}/model.json",
             "cass/stages.py", "cass/tracker.py", "cass/evaluate.py", "cass/calibration.py", "cass/explain.py",
             "cass/subgroups.py", "cass/classifier.py", "cass/models.py", "cass/metrics.py", "cass/training.py",
             *_CODE_DATA, "cass/lineage.py", *_CONFIG),
            ("seed", "data  # max_image_pixels, and group_columns / groups_file / groups_key of the subgroups",
             "augment", "evaluate", "finetune.num_workers", "finetune.device"),
            ("outputs/evaluate/${item}/metrics.json  # every test metric, per class too (the gate reads it)",
             "outputs/evaluate/${item}/lineage.json", "outputs/evaluate/${item}/predictions.csv",
             "outputs/evaluate/${item}/confusion_matrix.png", "outputs/evaluate/${item}/roc_curves.png",
             "outputs/evaluate/${item}/reliability.png", "outputs/evaluate/${item}/reliability.csv",
             "outputs/evaluate/${item}/class_counts.csv"),
            ("outputs/evaluate/${item}/scores.json  # the headline test numbers",), per_network=True,
        ),
        DvcStage(
            "model_gate", "The model gate (Great Expectations) on the ${item}'s test metrics - a failed check stops "
            "`dvc repro` here (`dvc repro --keep-going` goes on with the other network); `cass register` runs it "
            "again.",
            "cass validate model --network ${item}",
            ("outputs/evaluate/${item}/metrics.json", "cass/quality", "cass/pipeline.py", *_CONFIG),
            ("quality",), ("outputs/quality/model/${item}",), per_network=True,
        ),
    ]


_HEADER = """\
# The reproducible pipeline (docs/dvc.md), GENERATED by `cass dvc-yaml` from the stage list
# (cass.pipeline.STAGES, declared in cass/dvc_yaml.py) and params.yaml: change those and rerun `cass dvc-yaml`,
# never this file by hand (a stage that DVC runs refuses a dvc.yaml that is stale for params.yaml). Every stage
# calls the `cass` CLI, so `dvc repro`, `cass demo` and the Prefect flow run the same code; run it with the
# project's environment active (`. .venv/bin/activate`).
#
#   {flow}
#
# Which stages exist follows the settings as the flow does: pretrain only when finetune.init is cass, tune
# only when tune.enabled (then finetune applies its best_<network>.yaml), one item per finetune.networks.
# Each stage lists the settings it reads (a whole params.yaml section where it reads the section, so a key
# added there later is tracked too), the code it runs and the files it reads, so `dvc repro` reruns exactly
# what a change affects: a fine-tuning setting reruns finetune and evaluate, never pretrain; new data reruns
# everything. Outputs live under outputs/ (git-ignored); metrics and plots are cached by DVC like every other
# output, which is what lets `dvc metrics diff`, `dvc plots diff` and `dvc exp show` compare revisions.
# The declared metrics files hold numbers only (the headline test scores and the fine-tuning summary); where a
# model came from (commit, data version, the settings it was trained with, tuning, pretraining weights) is in
# lineage.json beside it, an output that `cass register` reads and `dvc metrics` does not show.
"""


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}".rstrip() for line in text.splitlines()]


def _scalar(key: str, value: str, indent: str) -> list[str]:
    """``key: value``, a long value wrapped as a plain multi-line scalar (what YAML reads back as one line)."""
    lines = textwrap.wrap(value, 116 - len(indent) - len(key) - 2, break_on_hyphens=False)
    return [f"{indent}{key}: {lines[0]}", *(f"{indent}  {line}" for line in lines[1:])]


def _items(key: str, values: Sequence[str], indent: str) -> list[str]:
    if not values:
        return []
    width = max(len(v.split("  # ")[0]) for v in values if "  # " in v) if any("  # " in v for v in values) else 0
    out = [f"{indent}{key}:"]
    for value in values:
        if value.startswith("# "):
            out.append(f"{indent}  {value}")
            continue
        item, _, comment = value.partition("  # ")
        out.append(f"{indent}  - {item.ljust(width)}  # {comment}" if comment else f"{indent}  - {item}")
    return out


def _stage(stage: DvcStage, networks: Sequence[str]) -> list[str]:
    out = [f"  {stage.name}:"]
    indent = "    "
    if stage.per_network:
        out += [f"    foreach: [{', '.join(networks)}]", "    do:"]
        indent = "      "
    out += _scalar("desc", stage.desc, indent)
    out += _comment(stage.note, indent) if stage.note else []
    out += [f"{indent}cmd: {stage.cmd}"]
    out += _items("deps", stage.deps, indent) + _items("params", stage.params, indent)
    out += _items("outs", stage.outs, indent) + _items("metrics", stage.metrics, indent)
    out += _comment(stage.after, indent) if stage.after else []
    return out


def _plots(p: Plan) -> list[str]:
    out = ["plots:"]
    if p.pretrain:
        out += ["  - outputs/pretrain/history.csv:", "      title: CASS pretraining loss", "      x: epoch",
                "      y: loss",
                "  - pretrain_embedding_std:",
                "      title: Embedding spread per network (collapse check; healthy = 1/sqrt(embed_dim))",
                "      x: epoch", "      y:",
                "        outputs/pretrain/history.csv: [cnn_embedding_std, vit_embedding_std, healthy_embedding_std]"]
    out += ["  - finetune_loss:", "      title: Fine-tuning loss (train and validation)", "      x: epoch", "      y:"]
    out += [f"        outputs/finetune/{n}/history.csv: [train_loss, val_loss]" for n in p.networks]
    out += ["  - finetune_val_macro_f1:", "      title: Validation macro F1 per epoch", "      x: epoch", "      y:"]
    out += [f"        outputs/finetune/{n}/history.csv: val_macro_f1" for n in p.networks]
    for name in ("confusion_matrix", "roc_curves", "reliability", "explanations"):
        out += [f"  - outputs/evaluate/{n}/{name}.png" for n in p.networks]
    return out


def _flow(stages: Sequence[DvcStage]) -> str:
    names = [f"{s.name}@net" if s.per_network else s.name for s in stages]
    return " -> ".join(["data.dvc (${data.root})", *names])


def render(params: Params) -> str:
    """The text of ``dvc.yaml`` for ``params``."""
    p = Plan.of(params)
    stages = p.stages()
    flow = textwrap.fill(_flow(stages), 110, subsequent_indent="#     ", break_on_hyphens=False)
    lines = [_HEADER.format(flow=flow).rstrip(), "", "stages:"]
    for i, stage in enumerate(stages):
        lines += ([""] if i else []) + _stage(stage, p.networks)
    lines += ["", *_plots(p)]
    return "\n".join(lines) + "\n"


def write(params: Params, path: Path = Path(DVC_YAML)) -> bool:
    """(Re)write ``path`` for ``params``; True when it changed."""
    from cass.io import atomic_write_text

    text = render(params)
    if path.is_file() and path.read_text() == text:
        return False
    atomic_write_text(path, text)
    return True


def stale(params: Params, path: Path = Path(DVC_YAML)) -> str | None:
    """Why ``path`` is not the ``dvc.yaml`` of ``params`` (None when it is). Compared as YAML, so an edited
    comment is not a difference; a stage, a dependency or a command is."""
    if not path.is_file():
        return f"{path} does not exist"
    try:
        current = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        return f"{path} is not valid YAML ({exc})"
    wanted = yaml.safe_load(render(params))
    if current == wanted:
        return None
    have, want = (current or {}).get("stages") or {}, wanted["stages"]
    missing, extra = [n for n in want if n not in have], [n for n in have if n not in want]
    changed = [n for n in want if n in have and have[n] != want[n]]
    parts = [f"{label}: {', '.join(names)}" for label, names in
             (("missing stages", missing), ("stages the settings do not run", extra), ("changed stages", changed))
             if names]
    return f"{path} is not the one the stage list and the settings give ({'; '.join(parts) or 'plots differ'})"


def refuse_stale(params: Params, params_file: str | Path = "params.yaml") -> None:
    """Under ``dvc repro`` / ``dvc exp run`` (DVC sets ``DVC_STAGE``), refuse to run a stage of a ``dvc.yaml``
    (in the stage's working directory) that is stale for ``params``: it would run another pipeline than
    the settings ask for (pretraining that fine-tuning never reads, best settings from a tuning that should
    not run). Outside DVC, nothing is checked."""
    if not os.environ.get("DVC_STAGE"):
        return
    reason = stale(params, Path.cwd() / DVC_YAML)
    if reason:
        raise ConfigError(f"DVC stage {os.environ['DVC_STAGE']}: {reason}, so it does not follow {params_file}. "
                          f"Run `{COMMAND}` to rewrite it from {params_file}, commit it, then `dvc repro` again")
