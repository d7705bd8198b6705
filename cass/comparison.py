"""Champion and challenger on the same unseen images, when they were tested on different splits.

A retraining on new data tests its model on a new test split, and the champion was tested on its own: the
two numbers are not comparable, and the champion cannot simply be scored on the new test split, which may
hold images it was trained on. So each version keeps the exact prepared manifest it was trained, validated
and tested on (``data/manifest.csv`` in its evaluation run: path, labels, split, sha256, group), and a
promotion between versions with different test splits scores BOTH registered models (loaded from the
registry and verified as :func:`cass.serving.load_verified` does, never local outputs) on the images that
neither trained or validated on: the challenger's test images whose content (sha256) and path are in the
train or val split of neither manifest. Both are scored in one MLflow run (``compare-<name>-v<a>-v<b>``),
which keeps each image's probabilities; the images' hash names the set.

The rule (docs/mlflow.md, "Champion and challenger on new data"): the challenger must beat the champion on
the shared images by ``mlflow.promotion_margin`` in ``mlflow.promotion_metric``, AND the paired bootstrap of
the difference (challenger - champion, the same resampled images for both, 2,000 resamples, seeded) must
put the lower end of its two-sided 95 % interval above zero; when the margin is beaten but the interval
reaches zero or below, the shared set is too small to separate the two and the promotion is refused, saying
so. Models of other classes, or one single-label and one multi-label, are not compared at all.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cass.errors import CassError
from cass.names import SCORE_METRICS
from cass.outputs import MANIFEST_FILE

if TYPE_CHECKING:
    import pandas as pd

    from cass.config import Params

log = logging.getLogger(__name__)

MANIFEST_DIR = "data"
MANIFEST_ARTIFACT = f"{MANIFEST_DIR}/{MANIFEST_FILE}"
MANIFEST_TAG = "manifest_sha256"
SEEN_SPLITS = ("train", "val")  # what a model trained (fine-tuning, pretraining's pool) or validated on
RESAMPLES = 2000
CONFIDENCE = 0.95
COMPARISON_TAG = "cass.comparison"  # on the run that scored both versions: "<name> v<champion> v<challenger>"


class ComparisonError(CassError):
    """The shared evaluation cannot run (a manifest was not kept, an image is not on disk as recorded)."""

    exit_code = 7


# --------------------------------------------------------------------------------------------------
# The manifest each version keeps


def manifest_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def version_manifest(client, name: str, version: str) -> pd.DataFrame:
    """The manifest version ``version`` of ``name`` was trained, validated and tested on, from the tracking
    server (its evaluation run's ``data/manifest.csv``)."""
    import mlflow
    import pandas as pd

    run_id = client.get_model_version(name, version).tags.get("evaluation_run_id")
    if not run_id:
        raise ComparisonError(f"{name} v{version} has no evaluation_run_id tag: the data it was trained on is not "
                              "known; promote with --force --reason after checking it yourself")
    with tempfile.TemporaryDirectory(prefix="cass-manifest-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=MANIFEST_ARTIFACT, dst_path=tmp)
        except Exception as exc:  # MlflowException, or the artifact store's own error
            raise ComparisonError(
                f"{name} v{version}: its evaluation run {run_id} keeps no {MANIFEST_ARTIFACT} (registered before "
                f"versions kept their manifest, or the artifact store did not answer: {str(exc).strip()[:160]}); "
                "its unseen images cannot be found. Promote with --force --reason after checking it yourself"
            ) from None
        text = Path(path).read_text()
    df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    missing = {"path", "labels", "split", "sha256"} - set(df.columns)
    if missing:
        raise ComparisonError(f"{name} v{version}: its {MANIFEST_ARTIFACT} lacks the columns {sorted(missing)}")
    return df


# --------------------------------------------------------------------------------------------------
# The shared unseen images


def unseen_rows(champion: pd.DataFrame, challenger: pd.DataFrame) -> pd.DataFrame:
    """The challenger's test images that neither model trained or validated on: neither their content
    (sha256) nor their path is in the train or val split of either manifest. One row per content."""
    seen = [m[m["split"].isin(SEEN_SPLITS)] for m in (champion, challenger)]
    seen_hashes = set().union(*(set(m["sha256"]) for m in seen))
    seen_paths = set().union(*(set(m["path"]) for m in seen))
    test = challenger[challenger["split"] == "test"]
    rows = test[~test["sha256"].isin(seen_hashes) & ~test["path"].isin(seen_paths)]
    return rows.drop_duplicates("sha256").sort_values("path").reset_index(drop=True)


def images_hash(rows: pd.DataFrame) -> str:
    """Names a set of labelled images: the hash of its sorted (sha256, labels) pairs."""
    lines = sorted(f"{s},{labels}" for s, labels in zip(rows["sha256"], rows["labels"], strict=True))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def read_images(rows: pd.DataFrame, root: Path) -> list[bytes]:
    """The bytes of each row's image under ``root``, checked against its recorded sha256."""
    out = []
    for rel, want in zip(rows["path"], rows["sha256"], strict=True):
        path = Path(root) / rel
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ComparisonError(f"{path}: cannot be read ({exc.strerror}); the shared test images must be on "
                                  "disk under data.root (`dvc pull` the data version the challenger was trained "
                                  "on)") from None
        if hashlib.sha256(data).hexdigest() != want:
            raise ComparisonError(f"{path}: its content differs from the sha256 recorded in the challenger's "
                                  f"manifest ({want[:12]}); check out the data version the challenger was trained on")
        out.append(data)
    return out


# --------------------------------------------------------------------------------------------------
# Scoring


def model_kind(metrics: Mapping[str, Any]) -> tuple[tuple[str, ...], bool]:
    """(classes, multi-label) of a version, from its test metrics (per-class scores; ``exact_match`` is
    reported for multi-label models only)."""
    return tuple(metrics.get("per_class") or {}), "exact_match" in metrics


def why_not_comparable(name: str, champion: str, challenger: str, champion_metrics: Mapping[str, Any],
                       challenger_metrics: Mapping[str, Any]) -> str | None:
    """Why two versions cannot be scored on the same images (other classes, single- vs multi-label), or None."""
    (a_classes, a_multi), (b_classes, b_multi) = model_kind(champion_metrics), model_kind(challenger_metrics)
    kind = {False: "single-label", True: "multi-label"}
    if a_multi != b_multi:
        return (f"not comparable: v{challenger} is {kind[b_multi]}, champion v{champion} is {kind[a_multi]}; "
                "promote with --force --reason if the task changed on purpose")
    if set(a_classes) != set(b_classes):
        return (f"not comparable: v{challenger} predicts classes {sorted(b_classes)}, champion v{champion} "
                f"{sorted(a_classes)}; promote with --force --reason if the classes changed on purpose")
    return None


def targets(rows: pd.DataFrame, classes: Sequence[str], multilabel: bool) -> np.ndarray:
    from cass.data.dataset import encode_targets
    from cass.data.manifest import label_lists

    return np.asarray(encode_targets(label_lists(rows), tuple(classes), multilabel))


def score_version(name: str, version: str, images: list[bytes], classes: Sequence[str]) -> np.ndarray:
    """The registered version's probabilities for ``images`` (columns in ``classes`` order)."""
    import pandas as pd

    from cass.serving import IMAGE_COLUMN, load_verified

    model = load_verified(f"models:/{name}/{version}")
    out = model.predict(pd.DataFrame({IMAGE_COLUMN: images}))
    return out[list(classes)].to_numpy(dtype=np.float64)


def metric_value(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], multilabel: bool, metric: str,
                 threshold: float) -> float:
    from cass.metrics import classification_metrics

    return float(classification_metrics(y, probs, classes, multilabel, threshold)[metric])


def paired_bootstrap(y: np.ndarray, champion: np.ndarray, challenger: np.ndarray, classes: Sequence[str],
                     multilabel: bool, metric: str, threshold: float, seed: int,
                     resamples: int = RESAMPLES) -> tuple[float, float]:
    """The two-sided ``CONFIDENCE`` interval of (challenger - champion) in ``metric`` over resamples of the
    shared images (each resample scores both models on the same images). Non-finite resamples are dropped."""
    rng = np.random.default_rng(seed)
    n, diffs = len(y), []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        d = (metric_value(y[idx], challenger[idx], classes, multilabel, metric, threshold)
             - metric_value(y[idx], champion[idx], classes, multilabel, metric, threshold))
        if np.isfinite(d):
            diffs.append(d)
    if not diffs:
        return float("nan"), float("nan")
    tail = (1 - CONFIDENCE) / 2 * 100
    lo, hi = np.percentile(diffs, [tail, 100 - tail])
    return float(lo), float(hi)


@dataclass(frozen=True)
class SharedEvaluation:
    """Both versions scored on the images neither trained or validated on."""

    name: str
    champion: str
    challenger: str
    metric: str
    images: int
    images_hash: str
    champion_value: float
    challenger_value: float
    lower: float  # the interval of challenger - champion
    upper: float
    run_id: str
    champion_metrics: Mapping[str, Any] = field(default_factory=dict)
    challenger_metrics: Mapping[str, Any] = field(default_factory=dict)

    @property
    def difference(self) -> float:
        return self.challenger_value - self.champion_value

    def record(self) -> dict[str, Any]:
        """What the promotion record keeps (``compared`` of its Decision)."""
        return {"compared_on": "shared unseen images", "champion": self.champion_value,
                "candidate": self.challenger_value, "shared_images": self.images,
                "shared_images_hash": self.images_hash, "shared_evaluation_run_id": self.run_id,
                "difference_interval": [self.lower, self.upper], "confidence": CONFIDENCE,
                "bootstrap_resamples": RESAMPLES}

    def verdict(self, margin: float) -> tuple[str | None, str]:
        """(why it is refused or None, why it is promoted), by the rule in the module docstring."""
        m, where = self.metric, f"on {self.images} shared unseen images ({self.images_hash[:12]})"
        both = (f"{m} {self.challenger_value:.4f} vs champion v{self.champion} {self.champion_value:.4f} {where}; "
                f"difference {self.difference:+.4f}, {CONFIDENCE:.0%} interval [{self.lower:+.4f}, {self.upper:+.4f}]")
        if not (np.isfinite(self.difference) and np.isfinite(self.lower)):
            return f"{m} cannot be computed {where} (challenger {self.challenger_value}, champion " \
                   f"{self.champion_value})", ""
        if self.difference < margin:
            return f"{both}: does not beat the champion by the margin {margin:g}", ""
        if self.lower <= 0:
            return (f"{both}: the shared test set is too small to separate the two (the interval reaches 0); "
                    "wait for more new test images, or use --force --reason"), ""
        return None, f"{both}: beats the champion by >= {margin:g}"


def compare_on_unseen(params: Params, name: str, champion: str, challenger: str, client,
                      champion_metrics: Mapping[str, Any], challenger_metrics: Mapping[str, Any]
                      ) -> SharedEvaluation | str:
    """Score both registered versions on the images neither trained or validated on, in one MLflow run;
    returns the evaluation, or why the two cannot be compared. The images are read from ``data.root`` and
    checked against the challenger's manifest."""
    reason = why_not_comparable(name, champion, challenger, champion_metrics, challenger_metrics)
    if reason:
        return reason
    rows = unseen_rows(version_manifest(client, name, champion), version_manifest(client, name, challenger))
    if rows.empty:
        return (f"not comparable: no test image of v{challenger} is unseen by champion v{champion} (every one is in "
                "a train or val split of either); add new images, or use --force --reason")
    classes, multilabel = model_kind(challenger_metrics)
    images = read_images(rows, Path(params.data.root))
    y = targets(rows, classes, multilabel)
    probs = {v: score_version(name, v, images, classes) for v in (champion, challenger)}
    threshold, metric = params.evaluate.threshold, params.mlflow.promotion_metric
    scores = {v: _metrics(y, p, classes, multilabel, threshold) for v, p in probs.items()}
    lo, hi = paired_bootstrap(y, probs[champion], probs[challenger], classes, multilabel, metric, threshold,
                              params.seed)
    digest = images_hash(rows)
    run_id = _log_run(client, name, champion, challenger, rows, probs, scores, digest, classes, (lo, hi))
    return SharedEvaluation(name, champion, challenger, metric, len(rows), digest, scores[champion][metric],
                            scores[challenger][metric], lo, hi, run_id, scores[champion], scores[challenger])


def _metrics(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], multilabel: bool, threshold: float) -> dict:
    from cass.metrics import classification_metrics

    m = classification_metrics(y, probs, classes, multilabel, threshold)
    return {k: float(v) for k, v in m.items() if k in SCORE_METRICS}


def _log_run(client, name: str, champion: str, challenger: str, rows: pd.DataFrame, probs: Mapping[str, np.ndarray],
             scores: Mapping[str, Mapping[str, float]], digest: str, classes: Sequence[str],
             interval: tuple[float, float]) -> str:
    """The MLflow run that keeps the shared evaluation: both versions' metrics, the interval, each image's
    probabilities; in the challenger's experiment."""
    evaluation = client.get_model_version(name, challenger).tags.get("evaluation_run_id")
    experiment = client.get_run(evaluation).info.experiment_id
    run = client.create_run(experiment, run_name=f"compare-{name}-v{champion}-v{challenger}", tags={
        COMPARISON_TAG: f"{name} v{champion} v{challenger}", "stage": "compare", "shared_images_hash": digest,
        "champion_version": champion, "challenger_version": challenger})
    run_id = run.info.run_id
    for role, version in (("champion", champion), ("challenger", challenger)):
        for k, v in scores[version].items():
            if np.isfinite(v):
                client.log_metric(run_id, f"{role}_{k}", v)
    for k, v in zip(("difference_lower", "difference_upper"), interval, strict=True):
        if np.isfinite(v):
            client.log_metric(run_id, k, v)
    client.log_metric(run_id, "shared_images", len(rows))
    table = rows[["path", "sha256", "labels"]].copy()
    for role, version in (("champion", champion), ("challenger", challenger)):
        for i, c in enumerate(classes):
            table[f"{role}_p_{c}"] = probs[version][:, i]
    with tempfile.TemporaryDirectory(prefix="cass-compare-") as tmp:
        path = Path(tmp) / "shared_images.csv"
        table.to_csv(path, index=False, float_format="%.6f")
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    log.info("%s: v%s and champion v%s scored on %d shared unseen images (run %s)", name, challenger, champion,
             len(rows), run_id)
    return run_id


def champion_on(params: Params, name: str, champion: str, rows: pd.DataFrame, metrics: Mapping[str, Any]) -> dict:
    """The champion's metrics on ``rows`` (the new unseen images): what the data-change report shows beside
    its metrics on its own test split."""
    classes, multilabel = model_kind(metrics)
    if rows.empty:
        return {}
    images = read_images(rows, Path(params.data.root))
    y = targets(rows, classes, multilabel)
    return _metrics(y, score_version(name, champion, images, classes), classes, multilabel, params.evaluate.threshold)
