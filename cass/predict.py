"""Prediction at volume: a model's probabilities for any number of image files, written as CSV or Parquet.

``cass predict`` and the sharded Prefect flow (``flows/predict.py``) call :func:`predict_to_file`. It is
built for runs of hundreds of thousands of images:

- **start-up**: the inputs, the output format and the settings are checked by :func:`plan` before torch
  or MLflow are imported, so a typo costs a second, not the time to load a model;
- **throughput**: batches through :func:`cass.inference.classify`, several scored at once on the CPU's
  threads, images decoded beside the forward pass;
- **interruption**: every ``chunk_size`` images a part is written atomically beside the output
  (:class:`cass.outputs.PredictionOutputs`); a rerun of the same command skips the images already in a
  part, and the output file itself appears only once, whole;
- **bad images**: a file that is missing or not an image is listed (``<output>.skipped.csv``) and skipped;
  the run goes on, and the caller decides what a non-empty list means (``cass predict`` exits 3).

Each row holds the path, the predicted label (or labels, ``|``-joined, for a multi-label model), one
probability per class (calibrated, as the served model gives them), the model's name, version and URI,
and when it was predicted (UTC).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from cass.errors import ConfigError, DataError
from cass.outputs import PredictionOutputs

log = logging.getLogger(__name__)

FORMATS = (".csv", ".parquet")
PATH_COLUMN = "path"
META_COLUMNS = ("model_name", "model_version", "model_uri", "predicted_at")
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Plan:
    """A checked prediction job: everything :func:`predict_to_file` needs, light enough to pass to a flow."""

    model: str
    inputs: tuple[str, ...]
    output: Path
    batch_size: int = 64
    workers: int | None = None  # decoding processes; None: chosen from the first batch's timings
    chunk_size: int = 1024
    lanes: int | None = None  # batches scored at once; None: one per torch thread (cass.inference.lanes_for)


@dataclass(frozen=True)
class Summary:
    output: Path
    predicted: int  # rows in the output
    skipped: int  # inputs listed in the skipped file
    resumed: int  # inputs found done in the parts of an earlier run
    seconds: float  # this run's time, model loading included
    workers: int = 0  # the decoding processes that read the images after the first batch

    def line(self) -> str:
        head = f"wrote {self.predicted} predictions to {self.output}"
        if self.resumed:
            head += f" ({self.resumed} from the interrupted run before)"
        return head


def output_format(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"--output {path}: write predictions to a .csv or .parquet file")
    return suffix


def _expand(item: str, extensions: frozenset[str]) -> list[str]:
    path = Path(item)
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in extensions and p.is_file())
    if path.is_file():
        return [item]
    if _GLOB_CHARS & set(item):
        return sorted(p for p in glob.glob(item, recursive=True) if Path(p).is_file())
    raise DataError(f"{item}: no such image file, folder or glob pattern; check the path")


def read_path_list(csv_file: Path, column: str = PATH_COLUMN) -> list[str]:
    """The paths in ``column`` of a CSV; a relative path is relative to the CSV's folder. The files are not
    opened here: a missing one is listed as skipped when its turn comes."""
    csv_file = Path(csv_file)
    try:
        with open(csv_file, newline="") as fh:
            reader = csv.DictReader(fh)
            if column not in (reader.fieldnames or []):
                raise DataError(f"{csv_file}: no column '{column}' (columns: {reader.fieldnames}); "
                                f"name the column of image paths '{column}'")
            rows = [(n, (row[column] or "").strip()) for n, row in enumerate(reader, start=2)]
    except FileNotFoundError:
        raise DataError(f"--csv {csv_file}: file not found") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_file}: not a readable CSV file ({exc})") from None
    if empty := [n for n, value in rows if not value]:
        raise DataError(f"{csv_file}: line {empty[0]} has an empty '{column}' ({len(empty)} such line(s))")
    return [value if Path(value).is_absolute() else str(csv_file.parent / value) for _, value in rows]


def resolve_inputs(items: Sequence[str], csv_file: Path | None = None, extra: Iterable[str] = ()) -> list[str]:
    """Image files from files, folders (searched recursively for image extensions), glob patterns
    (``**`` included), a CSV of paths and ``extra`` paths, in that order, each once."""
    from cass.data.images import IMAGE_EXTENSIONS

    found: list[str] = []
    for item in items:
        matched = _expand(str(item), IMAGE_EXTENSIONS)
        if not matched:
            raise DataError(f"{item}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found there")
        found += matched
    if csv_file is not None:
        found += read_path_list(csv_file)
    found += list(extra)
    if not found:
        raise DataError("no images to predict: give image files, folders, glob patterns, --csv or --dataset")
    return list(dict.fromkeys(found))


def check_model(model: str) -> None:
    """Refuse a model reference that cannot name a model, before anything heavy is loaded."""
    if model.startswith(("models:/", "runs:/", "s3://", "file:")) or Path(model).is_dir():
        return
    raise ConfigError(f"--model {model}: not a model folder, nor a models:/<name>@<alias>, models:/<name>/<version> "
                      "or runs:/<run>/<path> URI")


def plan(model: str, inputs: Sequence[str], output: Path, *, batch_size: int = 64, workers: int | None = None,
         chunk_size: int = 1024, lanes: int | None = None) -> Plan:
    """Check a job's settings (no torch, no MLflow): wrong values are refused while it is cheap. ``workers``
    None: as many as the first batch's timings say pay (:func:`cass.inference.auto_workers`)."""
    check_model(model)
    output_format(output)
    for name, value, low in (("--batch-size", batch_size, 1), ("--workers", workers, 0),
                             ("--chunk-size", chunk_size, 1), ("--lanes", lanes, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{name} {value}: must be >= {low}")
    if not Path(output).parent.is_dir():
        raise ConfigError(f"--output {output}: folder {Path(output).parent} does not exist; create it first")
    return Plan(model, tuple(inputs), Path(output), batch_size, workers, chunk_size, lanes)


# --------------------------------------------------------------------------------------------------
# Parts of an unfinished run


def _parts(out: PredictionOutputs, pattern: str) -> list[Path]:
    return sorted(out.parts.glob(pattern)) if out.parts.is_dir() else []


def _done(out: PredictionOutputs) -> set[str]:
    """The inputs an earlier run already predicted or listed as skipped."""
    done: set[str] = set()
    for part in _parts(out, "part-*.csv") + _parts(out, "skipped-*.csv"):
        with open(part, newline="") as fh:
            done.update(row[PATH_COLUMN] for row in csv.DictReader(fh))
    return done


def _check_same_model(out: PredictionOutputs, identity: dict[str, str]) -> None:
    """A resumed run must use the model the parts were made with (an alias may have moved meanwhile)."""
    if not out.job.is_file():
        return
    before = json.loads(out.job.read_text())
    if (before.get("model_name"), before.get("model_version"), before.get("digest")) != \
            (identity["model_name"], identity["model_version"], identity["digest"]):
        raise DataError(
            f"{out.parts}: an unfinished run made with {before.get('model_uri')} (version "
            f"{before.get('model_version') or '-'}); {identity['model_uri']} now is version "
            f"{identity['model_version'] or '-'}. Finish it with --model {before.get('model_uri')} "
            "(or its version), or delete the folder to start again"
        )


def _write_csv(path: Path, frame) -> None:
    from cass.io import atomic_write_text

    atomic_write_text(path, frame.to_csv(index=False))


def _write_table(path: Path, table) -> None:
    """The output file, whole, in the format its suffix names."""
    from cass.io import atomic_path

    if output_format(path) == ".parquet":
        with atomic_path(path) as tmp:
            table.to_parquet(tmp, index=False)
    else:
        _write_csv(path, table)


def _merge(out: PredictionOutputs, inputs: Sequence[str]) -> tuple[int, int]:
    """Write the output and the skipped list from the parts, in input order, then remove the parts."""
    import shutil

    import pandas as pd

    from cass.io import atomic_write_text

    order = {p: i for i, p in enumerate(inputs)}

    def read(pattern: str, empty_columns: list[str]) -> pd.DataFrame:
        frames = [pd.read_csv(p, dtype={PATH_COLUMN: str, "prediction": str, "model_version": str},
                              keep_default_na=False) for p in _parts(out, pattern)]
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=empty_columns)
        table = table[table[PATH_COLUMN].isin(order)].drop_duplicates(PATH_COLUMN, keep="last")
        return table.sort_values(PATH_COLUMN, key=lambda s: s.map(order), kind="stable").reset_index(drop=True)

    predicted = read("part-*.csv", [PATH_COLUMN, "prediction", *META_COLUMNS])
    skipped = read("skipped-*.csv", [PATH_COLUMN, "problem"])
    _write_table(out.output, predicted)
    if len(skipped):
        atomic_write_text(out.skipped, skipped.to_csv(index=False))
    else:
        out.skipped.unlink(missing_ok=True)
    shutil.rmtree(out.parts)
    return len(predicted), len(skipped)


# --------------------------------------------------------------------------------------------------
# The run


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class _Progress:
    """One log line at most every ``every`` seconds: images done, speed, time left."""

    def __init__(self, total: int, done: int, every: float = 10.0) -> None:
        self.total, self.done, self.every = total, done, every
        self.start = self.last = time.monotonic()
        self.count = 0

    def update(self, n: int, force: bool = False) -> None:
        self.count += n
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = self.count / max(now - self.start, 1e-9)
        left = self.total - self.done - self.count
        log.info("%d/%d images, %.1f images/s, about %s left", self.done + self.count, self.total, rate,
                 _eta(left / rate) if rate > 0 else "?")


def load_for_inference(model: str):
    """The network, its spec and preprocessing (anything with ``model``, ``spec`` and ``transform``) from a
    fine-tuning folder (weights and spec only: no code runs, MLflow is not imported) or a logged model
    (``models:/``, ``runs:/``, an MLflow model folder, verified before it loads); and the model's identity
    for the output rows."""
    from cass.outputs import FinetuneOutputs

    local = Path(model)
    if FinetuneOutputs(local).spec.is_file():
        import hashlib

        from cass.inference import load_folder

        digest = hashlib.sha256(FinetuneOutputs(local).weights.read_bytes()).hexdigest()
        return load_folder(local), {"model_name": local.name, "model_version": "", "model_uri": model, "digest": digest}
    from cass.serving import load_verified, model_identity

    wrapper = load_verified(model).unwrap_python_model()
    if not hasattr(wrapper, "spec"):
        raise DataError(f"{model} is not a CASS classifier (cass.serving.ImageClassifier)")
    return wrapper, model_identity(model)


def predict_to_file(job: Plan, loaded: tuple | None = None) -> Summary:
    """Predict ``job.inputs`` into ``job.output``, resuming from the parts an interrupted run left.

    ``loaded``: what :func:`load_for_inference` returned for ``job.model``, for a caller that keeps the model
    loaded between jobs (benchmarks/predict_speed.py times the images apart from the loading)."""
    import pandas as pd

    from cass.inference import classify, decided_labels

    started = time.monotonic()
    out = PredictionOutputs(job.output)
    classifier, identity = loaded or load_for_inference(job.model)
    _check_same_model(out, identity)
    out.parts.mkdir(parents=True, exist_ok=True)
    if not out.job.is_file():
        out.job.write_text(json.dumps({**identity, **{k: str(v) for k, v in asdict(job).items() if k != "inputs"}}))
    done = _done(out)
    todo = [p for p in job.inputs if p not in done]
    resumed = len(job.inputs) - len(todo)
    if resumed:
        log.info("resuming %s: %d of %d images done before", out.parts, resumed, len(job.inputs))
    number = max((int(p.stem.split("-")[1]) for p in _parts(out, "*-*.csv")), default=0)
    spec, classes = classifier.spec, list(classifier.spec.classes)
    progress = _Progress(len(job.inputs), resumed)
    rows: list = []
    skipped: list[tuple[str, str]] = []
    workers = 0

    def flush() -> None:
        """One part on disk, the skipped list first: a part's images count as done once both are written."""
        nonlocal number, rows, skipped
        number += 1
        if skipped:
            _write_csv(out.skipped_part(number), pd.DataFrame(skipped, columns=[PATH_COLUMN, "problem"]))
        if rows:
            _write_csv(out.part(number), pd.concat(rows, ignore_index=True))
        rows, skipped = [], []

    # One classify for the whole run (its lanes and any decoding workers start once); a part every chunk_size images.
    for batch in classify(classifier.model, spec, classifier.transform, todo, batch_size=job.batch_size,
                          workers=job.workers, lanes=job.lanes):
        table = pd.DataFrame(batch.probs, columns=classes)
        table.insert(0, "prediction", decided_labels(batch.probs, spec))
        table.insert(0, PATH_COLUMN, [todo[i] for i in batch.indices])
        for key in META_COLUMNS[:-1]:
            table[key] = identity[key]
        table["predicted_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        rows.append(table)
        workers = batch.workers
        skipped += [(todo[i], problem) for i, problem in batch.failed]
        for _, problem in batch.failed:
            log.warning("skipped %s", problem)
        progress.update(len(batch.indices) + len(batch.failed))
        if sum(map(len, rows)) + len(skipped) >= job.chunk_size:
            flush()
    if rows or skipped:
        flush()
    progress.update(0, force=True)
    predicted, n_skipped = _merge(out, job.inputs)
    return Summary(job.output, predicted, n_skipped, resumed, time.monotonic() - started, workers)


# --------------------------------------------------------------------------------------------------
# Shards: one job split over several processes or machines (flows/predict.py)


def write_shards(job: Plan, shards: int) -> list[Path]:
    """Split ``job.inputs`` into ``shards`` contiguous lists (their order kept), each written as a CSV of paths
    for one shard's run; a list already there (a rerun) is kept, so each shard resumes its own parts."""
    from cass.io import atomic_write_text

    if shards < 1:
        raise ConfigError(f"shards {shards}: must be >= 1")
    out = PredictionOutputs(job.output)
    out.shards.mkdir(parents=True, exist_ok=True)
    size = -(-len(job.inputs) // shards)
    lists = []
    for i in range(shards):
        path = out.shard_inputs(i)
        if not path.is_file():
            text = io.StringIO()
            writer = csv.writer(text, lineterminator="\n")
            writer.writerows([[PATH_COLUMN], *([p] for p in job.inputs[i * size:(i + 1) * size])])
            atomic_write_text(path, text.getvalue())
        lists.append(path)
    return lists


def merge_shards(job: Plan, shards: int) -> Summary:
    """The shards' outputs and skipped lists as one output (in input order), then the shard folder removed."""
    import shutil

    import pandas as pd

    out = PredictionOutputs(job.output)
    outputs = [out.shard_output(i) for i in range(shards)]
    if missing := [str(p) for p in outputs if not p.is_file()]:
        raise DataError(f"{out.shards}: shard output(s) {missing} not written; rerun the flow to finish them")
    read = {"dtype": {PATH_COLUMN: str, "prediction": str, "model_version": str}, "keep_default_na": False}
    predicted = pd.concat([pd.read_csv(p, **read) for p in outputs], ignore_index=True)
    skipped_files = [PredictionOutputs(p).skipped for p in outputs if PredictionOutputs(p).skipped.is_file()]
    skipped = pd.concat([pd.read_csv(p, **read) for p in skipped_files], ignore_index=True) if skipped_files \
        else pd.DataFrame(columns=[PATH_COLUMN, "problem"])
    _write_table(job.output, predicted)
    if len(skipped):
        _write_csv(out.skipped, skipped)
    shutil.rmtree(out.shards)
    return Summary(job.output, len(predicted), len(skipped), 0, 0.0)
