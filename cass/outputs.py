"""Where every stage writes: the one place that names the platform's output files and folders.

Stages, the CLI, the Prefect flow, DVC (``dvc.yaml`` spells the same paths) and the tracking code take
their paths from here; nothing else builds an output path from a string literal.

    outputs/                      Layout.root
      data/                       manifest.csv, dataset.json, subsets/fraction-<f>.csv
      quality/<gate>/             result.json, data_docs/ (gate reports); quality/decode-cache.json
      pretrain/                   cnn.safetensors, vit.safetensors, networks.json, metrics.json, history.csv
      tune/                       best_<network>.yaml, optuna_<network>.db
      finetune/<network>/         model.safetensors, model.json, metrics.json, history.csv, lineage.json
                                  (checkpoint.pt while a fine-tuning is unfinished)
      evaluate/<network>/         scores.json, metrics.json, lineage.json, predictions.csv, confusion_matrix.png,
                                  roc_curves.png, reliability.png, reliability.csv, explanations.png, class_counts.csv,
                                  subgroups.csv (with data.group_columns)
      data_change/<network>/      data_change.md, data_change.html, data_change.json, data_change_intensity.png
                                  (a run on another data version than the champion's)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Prepared data (cass.data).
MANIFEST_FILE = "manifest.csv"
INFO_FILE = "dataset.json"
SUBSET_DIR = "subsets"

# Files every training stage writes.
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
# Where a model came from (commit, data version, the settings it was trained with, its pretraining and
# tuning): kept apart from the metrics files, which hold numbers only.
LINEAGE_FILE = "lineage.json"

# The data-change report against the champion's data (cass.data_change): this folder in the outputs and
# in the version's evaluation run, where the model card finds it.
DATA_CHANGE_DIR = "data_change"
DATA_CHANGE_MD = "data_change.md"
DATA_CHANGE_HTML = "data_change.html"
DATA_CHANGE_JSON = "data_change.json"
DATA_CHANGE_FIGURE = "data_change_intensity.png"

# Gate reports (cass.quality).
RESULT_FILE = "result.json"
DOCS_DIR = "data_docs"


def subset_file(data_dir: Path, fraction: float) -> Path:
    """The label-fraction subset list of prepared data."""
    return Path(data_dir) / SUBSET_DIR / f"fraction-{fraction:g}.csv"


@dataclass(frozen=True)
class PretrainOutputs:
    """A pretraining folder (CASS or DINO write the same files); fine-tuning reads the weights."""

    out_dir: Path

    CHECKPOINT = "checkpoint.pt"
    DINO_CHECKPOINT = "checkpoint-dino.pt"

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / self.CHECKPOINT

    @property
    def dino_checkpoint(self) -> Path:
        return self.out_dir / self.DINO_CHECKPOINT

    @property
    def networks(self) -> Path:
        return self.out_dir / "networks.json"

    @property
    def metrics(self) -> Path:
        return self.out_dir / METRICS_FILE

    @property
    def history(self) -> Path:
        return self.out_dir / HISTORY_FILE

    def weights(self, network: str) -> Path:
        return self.out_dir / f"{network}.safetensors"

    @property
    def cnn(self) -> Path:
        return self.weights("cnn")

    @property
    def vit(self) -> Path:
        return self.weights("vit")


@dataclass(frozen=True)
class FinetuneOutputs:
    """A fine-tuned classifier: weights, the spec that rebuilds it, its metrics and curves."""

    out_dir: Path

    CHECKPOINT = "checkpoint.pt"

    @property
    def checkpoint(self) -> Path:
        """Resumes an interrupted fine-tuning; removed once the stage has written its outputs."""
        return self.out_dir / self.CHECKPOINT

    @property
    def weights(self) -> Path:
        return self.out_dir / "model.safetensors"

    @property
    def spec(self) -> Path:
        return self.out_dir / "model.json"

    @property
    def history(self) -> Path:
        return self.out_dir / HISTORY_FILE

    @property
    def metrics(self) -> Path:
        """Numbers only: the best epoch's validation summary (a DVC metrics file)."""
        return self.out_dir / METRICS_FILE

    @property
    def lineage(self) -> Path:
        """What the model was trained from and with: commit, data version, the full settings, the
        pretraining weights and the tuned values (what registration logs, never the current params.yaml)."""
        return self.out_dir / LINEAGE_FILE


@dataclass(frozen=True)
class PredictionOutputs:
    """What ``cass predict --output FILE`` writes beside FILE (any folder the user names, not outputs/)."""

    output: Path  # the predictions, .csv or .parquet, written whole once the last image is scored

    @property
    def parts(self) -> Path:
        """Chunks written atomically while the run goes on (``part-<n>.csv``, ``skipped-<n>.csv``) and
        ``job.json`` (which model): a rerun skips the images they hold; removed once ``output`` is written."""
        return self.output.with_name(self.output.name + ".parts")

    @property
    def job(self) -> Path:
        return self.parts / "job.json"

    def part(self, n: int) -> Path:
        return self.parts / f"part-{n:06d}.csv"

    def skipped_part(self, n: int) -> Path:
        return self.parts / f"skipped-{n:06d}.csv"

    @property
    def skipped(self) -> Path:
        """The images that could not be used (path, problem): listed, never a reason to stop the run."""
        return self.output.with_name(self.output.stem + ".skipped.csv")

    @property
    def shards(self) -> Path:
        """A sharded run (flows/predict.py): per shard its inputs (``shard-<i>.inputs.csv``) and its own
        resumable output (``shard-<i>.csv``), merged into ``output`` at the end; removed after the merge."""
        return self.output.with_name(self.output.name + ".shards")

    def shard_inputs(self, i: int) -> Path:
        return self.shards / f"shard-{i:04d}.inputs.csv"

    def shard_output(self, i: int) -> Path:
        return self.shards / f"shard-{i:04d}.csv"


@dataclass(frozen=True)
class EvaluateOutputs:
    """Test-split results of one network."""

    out_dir: Path

    @property
    def metrics(self) -> Path:
        """Every test metric, per class too (what the model gate, MLflow and promotion read)."""
        return self.out_dir / METRICS_FILE

    @property
    def scores(self) -> Path:
        """The headline test numbers only (the DVC metrics file of the stage)."""
        return self.out_dir / "scores.json"

    @property
    def lineage(self) -> Path:
        """Which model was evaluated (network, arch, weights digest), at which commit, on which data."""
        return self.out_dir / LINEAGE_FILE

    @property
    def confusion_matrix(self) -> Path:
        return self.out_dir / "confusion_matrix.png"

    @property
    def roc(self) -> Path:
        return self.out_dir / "roc_curves.png"

    @property
    def predictions(self) -> Path:
        return self.out_dir / "predictions.csv"

    # Calibration, explanations and subgroups (cass.calibration, cass.explain, cass.subgroups).
    @property
    def reliability(self) -> Path:
        """Reliability diagram before and after temperature scaling."""
        return self.out_dir / "reliability.png"

    @property
    def reliability_table(self) -> Path:
        """The ECE's per-bin table, raw and scaled."""
        return self.out_dir / "reliability.csv"

    @property
    def explanations(self) -> Path:
        """Heat maps of a seeded sample of test images per class."""
        return self.out_dir / "explanations.png"

    @property
    def subgroups(self) -> Path:
        """Per-subgroup macro F1 and balanced accuracy (when data.group_columns is set)."""
        return self.out_dir / "subgroups.csv"

    @property
    def class_counts(self) -> Path:
        """Images per class and split of the data the model was evaluated on."""
        return self.out_dir / "class_counts.csv"


@dataclass(frozen=True)
class GateOutputs:
    """The report folder of one quality gate."""

    out_dir: Path

    @property
    def result(self) -> Path:
        return self.out_dir / RESULT_FILE

    @property
    def docs(self) -> Path:
        return self.out_dir / DOCS_DIR


@dataclass(frozen=True)
class Layout:
    """Where each stage writes, under one root (``outputs/`` by default)."""

    root: Path = Path("outputs")

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    def best_params(self, network: str) -> Path:
        """The best fine-tuning settings ``cass tune`` found for ``network``."""
        return best_params_path(self.tune, network)

    def finetune(self, network: str) -> Path:
        return self.root / "finetune" / network

    def evaluate(self, network: str) -> Path:
        return self.root / "evaluate" / network

    def evaluate_metrics(self, network: str) -> Path:
        """The test metrics the model gate reads."""
        return EvaluateOutputs(self.evaluate(network)).metrics

    def data_change(self, network: str) -> Path:
        """The data-change report of ``network`` against its champion's data version (cass.data_change)."""
        return self.root / DATA_CHANGE_DIR / network

    @property
    def quality_dir(self) -> Path:
        """The gates' report folders, together (what a pipeline run logs as its quality report)."""
        return self.root / "quality"

    def quality(self, gate: str) -> Path:
        """Report folder of a gate (Data Docs, result.json): manifest, splits, model[/<network>]."""
        return self.quality_dir / gate

    @property
    def decode_cache(self) -> Path:
        """Decode results by content hash, kept beside (not inside) the gate reports that tools may delete."""
        return self.quality_dir / "decode-cache.json"


def best_params_path(tune_dir: Path, network: str) -> Path:
    return Path(tune_dir) / f"best_{network}.yaml"


def optuna_storage_file(tune_dir: Path, network: str) -> Path:
    """One SQLite file per network: one DVC output per tune stage."""
    return Path(tune_dir) / f"optuna_{network}.db"
