"""Data-quality and model gates: each check passes on clean data and fails on data with its fault planted.

Faults are planted in a copy of the session's prepared demo data (manifest rows and image files), so each
test sees exactly one fault; the assertion is that exactly the check meant for it fails, naming the row.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from cass.cli import main
from cass.config import Params, load_params, params_from_mapping, read_params_file
from cass.data.fingerprint import ensure_prepared, fingerprint, prepared_settings
from cass.data.manifest import read_manifest, write_manifest
from cass.data.prepare import prepare_data
from cass.errors import ConfigError, DataError, GateFailed
from cass.names import QUALITY_CHECKS
from cass.outputs import subset_file
from cass.quality import GateResult, validate_manifest, validate_model, validate_splits
from cass.quality.decode_cache import check_files
from tests.conftest import tiny_mapping

REPO = Path(__file__).resolve().parents[1]


def _png(size: tuple[int, int] = (32, 32), mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    arr = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze(), mode).save(buf, "PNG")
    return buf.getvalue()


class Workspace:
    """A private copy of the demo images and of their prepared manifest, to plant faults in."""

    def __init__(self, tmp_path: Path, demo_root: Path, prepared_dir: Path, **quality) -> None:
        self.root = tmp_path / "images"
        shutil.copytree(demo_root, self.root)
        self.data = tmp_path / "data"
        shutil.copytree(prepared_dir, self.data)
        self.df, info = read_manifest(self.data)
        raw = tiny_mapping(self.root)
        raw["quality"] = quality
        self.params: Params = params_from_mapping(raw)
        settings = prepared_settings(self.params)  # as if prepare had run on this copy with these settings
        self.info = replace(info, root=str(self.root), settings=settings, fingerprint=fingerprint(settings))
        write_manifest(self.df, self.info, self.data)
        self.reports = tmp_path / "quality"

    def save(self) -> None:
        write_manifest(self.df, self.info, self.data)

    def plant(self, rel: str, data: bytes) -> None:
        """Write ``data`` at ``rel`` and record its hash in the manifest, as if prepare had seen it."""
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.root / rel).write_bytes(data)
        self.df.loc[self.df["path"] == rel, "sha256"] = hashlib.sha256(data).hexdigest()
        self.save()

    def row(self, split: str = "train", label: str = "adipose", k: int = 0) -> str:
        rows = self.df[(self.df["split"] == split) & (self.df["labels"] == label)]
        return str(rows["path"].iloc[k])

    def manifest(self, **kwargs) -> GateResult:
        return validate_manifest(self.params, self.data, self.reports / "manifest", raise_on_failure=False, **kwargs)

    def splits(self) -> GateResult:
        return validate_splits(self.params, self.data, self.reports / "splits", raise_on_failure=False)


@pytest.fixture
def ws(tmp_path: Path, demo_root: Path, prepared_dir: Path) -> Workspace:
    return Workspace(tmp_path, demo_root, prepared_dir)


def failed(result: GateResult) -> set[str]:
    return {f.check for f in result.failures}


def examples(result: GateResult, check: str) -> str:
    return "\n".join(e for f in (*result.failures, *result.warnings) if f.check == check for e in f.examples)


# --------------------------------------------------------------------------------------------------
# Manifest gate


def test_clean_manifest_passes_and_writes_data_docs(ws: Workspace) -> None:
    result = ws.manifest()
    assert result.success, result.summary()
    assert not result.failures and not result.warnings
    assert result.docs == ws.reports / "manifest" / "data_docs" / "index.html" and result.docs.is_file()
    saved = json.loads(result.result_file.read_text())
    assert saved["success"] is True and saved["rows"] == {"images": 64, "classes": 4}
    docs = ws.reports / "manifest" / "data_docs"
    assert list((docs / "validations").rglob("*.html")), "no validation result page"
    assert "the training loader cannot decode" in (docs / "expectations" / "manifest" / "images.html").read_text()


def _truncated(ws: Workspace, rel: str) -> None:
    good = (ws.root / rel).read_bytes()
    ws.plant(rel, good[: len(good) // 2])


PLANTED_FILES = {
    "truncated": (_truncated, "decodes", "truncated"),
    "zero-byte": (lambda ws, rel: ws.plant(rel, b""), "decodes", "empty"),
    "non-image": (lambda ws, rel: ws.plant(rel, b"<html>404 Not Found</html>\n"), "decodes", "not an image"),
    "missing": (lambda ws, rel: (ws.root / rel).unlink(), "file_exists", "exists = False"),
    "too narrow": (lambda ws, rel: ws.plant(rel, _png((8, 40))), "width_in_bounds", "width = 8"),
    "replaced after prepare": (lambda ws, rel: (ws.root / rel).write_bytes(_png(seed=5)), "file_unchanged", ""),
}


@pytest.mark.parametrize("fault", list(PLANTED_FILES))
def test_planted_file_fault_fails_its_check_naming_the_file(ws: Workspace, fault: str) -> None:
    plant, check, detail = PLANTED_FILES[fault]
    rel = ws.row("train", "stroma", 1)
    plant(ws, rel)
    result = ws.manifest()
    assert not result.success
    assert failed(result) == {check}, result.summary()
    assert rel in examples(result, check) and detail in examples(result, check)
    assert rel in result.summary()


def test_path_leaving_the_data_root_fails_and_is_not_read(ws: Workspace) -> None:
    outside = ws.root.parent / "secret.png"
    outside.write_bytes(_png())
    ws.df.loc[ws.df["path"] == ws.row(), "path"] = "../secret.png"
    ws.save()
    result = ws.manifest()
    assert failed(result) == {"inside_root"}, result.summary()
    assert "../secret.png" in examples(result, "inside_root")


def test_mode_outside_the_allowed_set_fails(tmp_path: Path, demo_root: Path, prepared_dir: Path) -> None:
    ws = Workspace(tmp_path, demo_root, prepared_dir, allowed_modes=["RGB"])
    rel = ws.row("test", "tumor")
    ws.plant(rel, _png(mode="L"))
    result = ws.manifest()
    assert failed(result) == {"mode_allowed"}, result.summary()
    assert f"{rel}: mode = L" in examples(result, "mode_allowed")


@pytest.mark.parametrize(
    ("labels", "check"),
    [("cancer", "labels_known"), ("", "has_label"), ("adipose|stroma", "single_label")],
    ids=["unknown label", "no label", "two labels in a single-label set"],
)
def test_planted_label_fault_fails_its_check(ws: Workspace, labels: str, check: str) -> None:
    rel = ws.row("val", "lymphocytes")
    ws.df.loc[ws.df["path"] == rel, "labels"] = labels
    ws.save()
    result = ws.manifest()
    assert failed(result) == {check}, result.summary()
    assert rel in examples(result, check)


def test_same_content_under_two_labels_fails(ws: Workspace) -> None:
    original, copy = ws.row("train", "adipose"), ws.row("train", "tumor")
    ws.plant(copy, (ws.root / original).read_bytes())
    result = ws.manifest()
    assert failed(result) == {"hash_label_conflict"}, result.summary()
    shown = examples(result, "hash_label_conflict")
    assert original in shown and copy in shown and "adipose vs tumor" in shown


def test_too_few_images_in_a_class_fails(ws: Workspace) -> None:
    keep = ws.df["labels"] != "stroma"
    keep[ws.df.index[ws.df["labels"] == "stroma"][:3]] = True
    ws.df = ws.df[keep]
    ws.save()
    result = ws.manifest()
    assert failed(result) == {"min_images_per_class"}, result.summary()
    assert "stroma: images = 3" in examples(result, "min_images_per_class")


def test_imbalance_warns_without_stopping_then_fails_above_the_fail_level(
    tmp_path: Path, demo_root: Path, prepared_dir: Path
) -> None:
    ws = Workspace(tmp_path / "warn", demo_root, prepared_dir, imbalance_warn_ratio=2.0, imbalance_fail_ratio=4.0)
    keep = ws.df["labels"] != "tumor"
    keep[ws.df.index[ws.df["labels"] == "tumor"][:6]] = True
    ws.df = ws.df[keep]
    ws.save()
    result = ws.manifest()
    assert result.success, result.summary()
    assert [w.check for w in result.warnings] == ["imbalance_warn"]
    assert "WARN imbalance_warn" in result.summary() and "tumor" in examples(result, "imbalance_warn")

    strict = Workspace(tmp_path / "fail", demo_root, prepared_dir, imbalance_warn_ratio=1.5, imbalance_fail_ratio=2.0)
    strict.df = ws.df
    strict.save()
    result = strict.manifest()
    assert failed(result) == {"imbalance_fail"} and [w.check for w in result.warnings] == ["imbalance_warn"]


def test_empty_manifest_fails(ws: Workspace) -> None:
    ws.df = ws.df.iloc[0:0]
    ws.save()
    assert "rows_present" in failed(ws.manifest())


def test_severity_from_params_turns_a_failure_into_a_warning(
    tmp_path: Path, demo_root: Path, prepared_dir: Path
) -> None:
    ws = Workspace(tmp_path, demo_root, prepared_dir, severity={"decodes": "warn"})
    _truncated(ws, ws.row())
    result = ws.manifest()
    assert result.success and [w.check for w in result.warnings] == ["decodes"]


def test_failed_gate_raises_with_a_summary_and_keeps_the_report(ws: Workspace) -> None:
    rel = ws.row()
    ws.plant(rel, b"")
    with pytest.raises(GateFailed) as exc:
        validate_manifest(ws.params, ws.data, ws.reports / "manifest")
    assert exc.value.exit_code == GateFailed.exit_code
    assert "FAIL decodes" in str(exc.value) and rel in str(exc.value) and "data_docs/index.html" in str(exc.value)
    assert json.loads((ws.reports / "manifest" / "result.json").read_text())["success"] is False


# --------------------------------------------------------------------------------------------------
# Decode cache


def test_unchanged_files_are_not_decoded_again(ws: Workspace, tmp_path: Path) -> None:
    paths = ws.df["path"].tolist()
    cache = tmp_path / "cache.json"
    first = check_files(ws.root, paths, 10_000, cache)
    assert not any(c.cached for c in first)
    rel = paths[3]
    (ws.root / rel).write_bytes(_png(seed=9))  # changed content: decoded again
    truncated = paths[4]
    (ws.root / truncated).write_bytes((ws.root / truncated).read_bytes()[:100])
    second = {p: c for p, c in zip(paths, check_files(ws.root, paths, 10_000, cache), strict=True)}
    assert not second[rel].cached and not second[truncated].cached and second[truncated].error
    assert sum(c.cached for c in second.values()) == len(paths) - 2
    third = {p: c for p, c in zip(paths, check_files(ws.root, paths, 10_000, cache), strict=True)}
    assert third[rel].cached and not third[truncated].cached  # failures are never cached
    assert not any(c.cached for c in check_files(ws.root, paths, 5_000, cache))  # another pixel limit: redo


def test_parallel_check_matches_serial(ws: Workspace, tmp_path: Path) -> None:
    paths = ws.df["path"].tolist()
    _truncated(ws, paths[10])
    serial = check_files(ws.root, paths, 10_000, tmp_path / "a.json", workers=1)
    parallel = check_files(ws.root, paths, 10_000, tmp_path / "b.json", workers=2)
    assert serial == parallel and serial[10].error


# --------------------------------------------------------------------------------------------------
# Split gate


def test_clean_splits_pass(ws: Workspace) -> None:
    result = ws.splits()
    assert result.success, result.summary()
    assert result.docs is not None and result.docs.is_file()


def test_same_image_in_train_and_test_fails(ws: Workspace) -> None:
    train, test = ws.row("train", "stroma"), ws.row("test", "stroma")
    ws.df.loc[ws.df["path"] == test, "sha256"] = ws.df.loc[ws.df["path"] == train, "sha256"].iloc[0]
    ws.save()
    result = ws.splits()
    assert failed(result) == {"hash_one_split"}, result.summary()
    assert f"{test}: image_in_splits = test, train" in examples(result, "hash_one_split")


def test_one_patient_in_two_splits_fails(ws: Workspace) -> None:
    ws.df["group"] = [f"patient-{i}" for i in range(len(ws.df))]
    ws.df.loc[ws.df["path"].isin([ws.row("train"), ws.row("val")]), "group"] = "patient-x"
    ws.save()
    result = ws.splits()
    assert failed(result) == {"group_one_split"}, result.summary()
    assert "group_in_splits = train, val" in examples(result, "group_one_split")


def test_class_missing_from_a_split_fails(ws: Workspace) -> None:
    ws.df = ws.df[~((ws.df["labels"] == "tumor") & (ws.df["split"] == "val"))]
    ws.save()
    result = ws.splits()
    assert failed(result) == {"class_in_every_split"}, result.summary()
    assert examples(result, "class_in_every_split") == "tumor / val: images = 0"


def test_subset_row_outside_train_fails(ws: Workspace) -> None:
    subset = subset_file(ws.data, 0.25)
    rows = pd.read_csv(subset, dtype=str)
    leaked = ws.row("test", "adipose")
    pd.concat([rows, pd.DataFrame({"path": [leaked], "labels": ["adipose"]})]).to_csv(subset, index=False)
    result = ws.splits()
    assert failed(result) == {"subset_in_train"}, result.summary()
    assert f"0.25 / {leaked}: split = test" in examples(result, "subset_in_train")


def test_unknown_split_name_fails(ws: Workspace) -> None:
    rel = ws.row("train", "adipose", 2)
    ws.df.loc[ws.df["path"] == rel, "split"] = "holdout"
    ws.save()
    result = ws.splits()
    assert "split_known" in failed(result) and rel in examples(result, "split_known")


# --------------------------------------------------------------------------------------------------
# Model gate


def _metrics(**changes) -> dict:
    metrics = {
        "network": "cnn",
        "macro_f1": 0.82,
        "balanced_accuracy": 0.8,
        "accuracy": 0.85,
        "macro_auroc": 0.93,
        "per_class": {c: {"recall": 0.8, "precision": 0.8} for c in ("adipose", "lymphocytes", "stroma", "tumor")},
    }
    for key, value in changes.items():
        if value is _DROP:
            del metrics[key]
        else:
            metrics[key] = value
    return metrics


_DROP = object()


def _model_gate(tmp_path: Path, tiny_params: Params, metrics: dict | str) -> GateResult:
    path = tmp_path / "metrics.json"
    path.write_text(metrics if isinstance(metrics, str) else json.dumps(metrics))
    return validate_model(tiny_params, path, tmp_path / "report", raise_on_failure=False)


def test_good_metrics_pass(tmp_path: Path, tiny_params: Params) -> None:
    result = _model_gate(tmp_path, tiny_params, _metrics())
    assert result.success, result.summary()
    assert result.docs is not None and result.docs.is_file()


@pytest.mark.parametrize(
    ("changes", "check", "shown"),
    [
        ({"macro_f1": 0.3}, "macro_f1_floor", "macro_f1: value = 0.3"),
        ({"balanced_accuracy": 0.2}, "balanced_accuracy_floor", "balanced_accuracy: value = 0.2"),
        ({"macro_auroc": None}, "metric_not_nan", "macro_auroc: value = NaN"),
        ({"macro_auroc": _DROP}, "metric_present", "macro_auroc: present = False"),
        ({"accuracy": 85.0}, "metric_in_range", "accuracy: value = 85"),
    ],
    ids=["macro F1 below floor", "balanced accuracy below floor", "NaN metric", "missing metric", "percentage"],
)
def test_bad_metric_fails_its_check(
    tmp_path: Path, demo_root: Path, changes: dict, check: str, shown: str
) -> None:
    raw = tiny_mapping(demo_root)
    raw["quality"] = {"expected_metrics": ["macro_f1", "balanced_accuracy", "accuracy", "macro_auroc"]}
    result = _model_gate(tmp_path, params_from_mapping(raw), _metrics(**changes))
    assert failed(result) == {check}, result.summary()
    assert shown in examples(result, check)


def test_literal_nan_in_the_metrics_file_fails(tmp_path: Path, tiny_params: Params) -> None:
    text = json.dumps(_metrics(macro_f1=float("nan")))
    assert "NaN" in text
    result = _model_gate(tmp_path, tiny_params, text)
    assert "metric_not_nan" in failed(result)


def test_class_with_zero_recall_fails(tmp_path: Path, tiny_params: Params) -> None:
    metrics = _metrics()
    metrics["per_class"]["stroma"]["recall"] = 0.0
    result = _model_gate(tmp_path, tiny_params, metrics)
    assert failed(result) == {"class_recall_nonzero"}
    assert examples(result, "class_recall_nonzero") == "stroma: recall = 0"


# --------------------------------------------------------------------------------------------------
# Settings, CLI and pipeline


def test_unknown_check_in_severity_is_rejected_with_a_suggestion(demo_root: Path) -> None:
    raw = tiny_mapping(demo_root)
    raw["quality"] = {"severity": {"decode": "warn"}}
    with pytest.raises(ConfigError, match="did you mean 'decodes'"):
        params_from_mapping(raw)
    raw["quality"] = {"imbalance_warn_ratio": 50, "imbalance_fail_ratio": 10}
    with pytest.raises(ConfigError, match="imbalance_warn_ratio"):
        params_from_mapping(raw)


def test_every_check_declared_in_the_settings_is_run(ws: Workspace, tmp_path: Path, tiny_params: Params) -> None:
    """A check missing from QUALITY_CHECKS could not be given a severity; one never run would be dead config."""
    results = (ws.manifest(), ws.splits(), _model_gate(tmp_path, tiny_params, _metrics()))
    run = [name for r in results for name in json.loads(r.result_file.read_text())["checks"]]
    # The DICOM checks run on DICOM data only: tests/test_dicom.py's gate test sees each of them fire.
    assert sorted(run) == sorted(c for c in QUALITY_CHECKS if not c.startswith("dicom_"))
    assert len(QUALITY_CHECKS) - len(run) == 6


def test_importing_cass_quality_does_not_import_great_expectations() -> None:
    code = "import sys, cass.quality; sys.exit('great_expectations' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def _params_file(tmp_path: Path, root: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_mapping(root)))
    return path


def test_cli_validate_exits_non_zero_with_a_readable_summary(
    ws: Workspace, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    outputs = Path("outputs")  # relative, as in `cass validate manifest` run from the project root
    shutil.copytree(ws.data, outputs / "data")
    params = _params_file(tmp_path, ws.root)
    argv = ["validate", "manifest", "--params", str(params), "--outputs", str(outputs), "-q"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "manifest gate passed" in out and "report: outputs/quality/manifest/data_docs/index.html" in out
    assert (outputs / "quality" / "manifest" / "data_docs" / "index.html").is_file()

    rel = ws.row()
    (ws.root / rel).write_bytes(b"")
    assert main(argv) == GateFailed.exit_code
    err = capsys.readouterr().err
    assert "manifest gate FAILED" in err and f"{rel}: decode_error = the file is empty" in err
    assert "report: " in err
    assert main(["validate", "splits", "--params", str(params), "--outputs", str(outputs), "-q"]) == 0
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(_metrics(macro_f1=0.1)))
    assert main(["validate", "model", "--metrics", str(metrics), "--params", str(params), "-q"]) == 5
    assert "FAIL macro_f1_floor" in capsys.readouterr().err
    assert (Path("outputs") / "quality" / "model" / "result.json").is_file()


def test_bad_data_stops_cass_demo_before_pretraining(
    tmp_path: Path, demo_root: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "images"
    shutil.copytree(demo_root, root)
    # The same picture in two class folders: prepare accepts it, the manifest gate must not.
    shutil.copy(root / "adipose" / "adipose_0000.png", root / "tumor" / "copied.png")
    outputs = tmp_path / "outputs"
    code = main(["demo", "--no-mlflow", "--params", str(_params_file(tmp_path, root)), "--outputs", str(outputs), "-q"])
    assert code == GateFailed.exit_code
    err = capsys.readouterr().err
    assert "hash_label_conflict" in err and "tumor/copied.png" in err
    assert (outputs / "data" / "manifest.csv").is_file()
    assert not (outputs / "pretrain").exists() and not (outputs / "finetune").exists()
    assert json.loads((outputs / "quality" / "manifest" / "result.json").read_text())["success"] is False


# --------------------------------------------------------------------------------------------------
# Prepared data must be the data asked about (issue 18)


def test_gates_refuse_outputs_prepared_from_another_dataset(
    tmp_path: Path, demo_root: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed prepare leaves the previous outputs; a gate asked about the new data must not pass on them."""
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other"
    shutil.copytree(demo_root, other)
    (other / "tumor" / "tumor_0001.png").write_bytes(b"")
    common = ["--params", str(_params_file(tmp_path, demo_root)), "--outputs", "outputs", "-q"]
    assert main(["data", "prepare", *common]) == 0
    before = Path("outputs/data/manifest.csv").read_bytes()
    assert main(["data", "prepare", *common, "--set", f"data.root={other}"]) == DataError.exit_code
    assert Path("outputs/data/manifest.csv").read_bytes() == before
    capsys.readouterr()
    for gate in ("manifest", "splits"):
        assert main(["validate", gate, *common, "--set", f"data.root={other}"]) == DataError.exit_code, gate
        err = capsys.readouterr().err
        assert f"data.root: prepared from '{demo_root}', asked about '{other}'" in err, err
        assert "run `cass data prepare`" in err
    assert main(["validate", "manifest", *common]) == 0  # the data it was prepared from


def test_changed_split_settings_or_an_unstamped_manifest_are_refused(ws: Workspace) -> None:
    ensure_prepared(ws.params, ws.data)
    reseeded = ws.params.model_copy(update={"split": ws.params.split.model_copy(update={"seed": 8})})
    with pytest.raises(DataError, match=r"split.seed: prepared from 7, asked about 8"):
        validate_splits(reseeded, ws.data, ws.reports / "splits")
    ws.info = replace(ws.info, fingerprint="", settings={})  # written by an older cass
    ws.save()
    with pytest.raises(DataError, match="records no settings fingerprint"):
        ws.manifest()


# --------------------------------------------------------------------------------------------------
# Settings the data implies (issue 18)


def _image(mode: str, seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 4096, (size, size), dtype=np.uint16))
    channels = {"L": 1, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 255, (size, size, channels), dtype=np.uint8).squeeze(), mode)


def test_grayscale_16_bit_and_rgba_data_pass_with_the_shipped_settings(tmp_path: Path) -> None:
    root = tmp_path / "scans"
    for i in range(21):
        for cls, mode in (("normal", "L"), ("lesion", "RGBA"), ("ct", "I;16")):
            (root / cls).mkdir(parents=True, exist_ok=True)
            _image(mode, seed=i * 3 + len(cls)).save(root / cls / f"{i}.png")
    raw = tiny_mapping(root)
    raw["quality"] = read_params_file(REPO / "params.yaml")["quality"]
    params = params_from_mapping(raw)
    data = prepare_data(params, tmp_path / "data")
    df, _ = read_manifest(data)
    assert set(df["mode"]) >= {"L", "RGBA"} and set(df["mode"]) & {"I;16", "I"}
    result = validate_manifest(params, data, tmp_path / "report", raise_on_failure=False)
    assert result.success, result.summary()


def test_a_mode_outside_a_narrowed_set_names_the_value_to_set(
    tmp_path: Path, demo_root: Path, prepared_dir: Path
) -> None:
    ws = Workspace(tmp_path, demo_root, prepared_dir, allowed_modes=["RGB"])
    ws.plant(ws.row("test", "tumor"), _png(mode="L"))
    result = ws.manifest()
    assert failed(result) == {"mode_allowed"}
    assert "set quality.allowed_modes: [RGB, L]" in result.summary()


def test_multilabel_metrics_pass_the_model_gate_with_the_shipped_settings(tmp_path: Path) -> None:
    overrides = ["data.layout=csv", "data.csv.file=labels.csv", "data.csv.multilabel=true"]
    params = load_params(REPO / "params.yaml", overrides)
    metrics = {k: v for k, v in _metrics().items() if k != "accuracy"}
    metrics.update(exact_match=0.7, threshold=0.5)  # what evaluation writes for multi-label data
    result = _model_gate(tmp_path, params, metrics)
    assert result.success, result.summary()
    metrics.pop("exact_match")
    assert "metric_present" in failed(_model_gate(tmp_path, params, metrics))  # exact_match is required
