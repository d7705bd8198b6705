"""Calibration: the ECE against hand-computed values, temperature scaling that fixes an over-confident model,
multi-label thresholds, the model gate's ECE ceiling, and served probabilities equal to evaluation's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cass.calibration import (
    calibrate_classifier,
    choose_thresholds,
    collect_logits,
    expected_calibration_error,
    fit_temperature,
    probabilities,
    reliability_table,
)
from cass.classifier import ClassifierSpec
from cass.config import EvaluateConfig, Params, params_from_mapping


def test_ece_matches_a_hand_computed_example() -> None:
    # Top-class confidences 0.55 (right), 0.65 (wrong), 0.90, 0.95 (right), 0.85 (wrong); 5 bins of width 0.2:
    #   (0.4, 0.6]: 1 image, accuracy 1, confidence 0.55 -> gap 0.45
    #   (0.6, 0.8]: 1 image, accuracy 0, confidence 0.65 -> gap 0.65
    #   (0.8, 1.0]: 3 images, accuracy 2/3, confidence 0.90 -> gap 0.2333
    # ECE = 1/5 x 0.45 + 1/5 x 0.65 + 3/5 x 0.2333 = 0.36
    top = np.array([0.55, 0.65, 0.90, 0.95, 0.85])
    probs = np.stack([top, 1 - top], axis=1)
    y = np.array([0, 1, 0, 0, 1])
    assert expected_calibration_error(probs, y, multilabel=False, n_bins=5) == pytest.approx(0.36)
    table = reliability_table(probs, y, multilabel=False, n_bins=5)
    assert table["count"].tolist() == [0, 0, 1, 1, 3]
    assert table.loc[4, "accuracy"] == pytest.approx(2 / 3) and table.loc[4, "confidence"] == pytest.approx(0.9)


def test_multilabel_ece_compares_each_probability_with_the_fraction_of_positives() -> None:
    # Six label probabilities, 2 bins: (0, 0.5] holds 0.1, 0.2, 0.4 with 1 positive of 3 -> |1/3 - 0.2333|;
    # (0.5, 1] holds 0.6, 0.8, 0.9 with 3 positives -> |1 - 0.7667|. ECE = (0.1 + 0.2333) / 2.
    probs = np.array([[0.1, 0.9], [0.2, 0.8], [0.4, 0.6]])
    y = np.array([[0, 1], [0, 1], [1, 1]])
    assert expected_calibration_error(probs, y, multilabel=True, n_bins=2) == pytest.approx((0.1 + 0.7 / 3) / 2)


def test_ece_of_a_perfectly_calibrated_bin_is_zero() -> None:
    probs = np.array([[0.75, 0.25]] * 4)
    y = np.array([0, 0, 0, 1])  # right 3 times in 4 at confidence 0.75
    assert expected_calibration_error(probs, y, multilabel=False, n_bins=10) == pytest.approx(0.0)


def _calibrated_logits(n: int, seed: int, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true label distribution: labels are drawn from it."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, size=(n, k))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    return logits, y


def test_fitted_temperature_undoes_a_known_overconfidence() -> None:
    logits, y = _calibrated_logits(4000, seed=0)
    assert fit_temperature(logits * 3.0, y, multilabel=False) == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(logits, y, multilabel=False) == pytest.approx(1.0, rel=0.1)


class _Overconfident(torch.nn.Module):
    """A fixed linear model whose logits are 6 x the calibrated ones: right as often, far too sure."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 6.0 * x


def test_temperature_scaling_lowers_the_ece_of_an_overconfident_model() -> None:
    logits, y = _calibrated_logits(3000, seed=1)
    val = DataLoader(TensorDataset(torch.tensor(logits[:1500], dtype=torch.float32), torch.tensor(y[:1500])),
                     batch_size=256)
    spec = ClassifierSpec("cnn", "x", 32, ("a", "b", "c", "d"), False, (0, 0, 0), (1, 1, 1))
    model = _Overconfident()
    calibrated = calibrate_classifier(model, val, spec, EvaluateConfig(), "cpu")
    assert calibrated.temperature == pytest.approx(6.0, rel=0.15)
    test = DataLoader(TensorDataset(torch.tensor(logits[1500:], dtype=torch.float32), torch.tensor(y[1500:])),
                      batch_size=256)
    test_logits, test_y = collect_logits(model, test, "cpu")
    before = expected_calibration_error(probabilities(test_logits, False), test_y, False)
    after = expected_calibration_error(probabilities(test_logits, False, calibrated.temperature), test_y, False)
    assert before > 0.15 and after < 0.05, (before, after)
    # Temperature never changes which class ranks first.
    assert (probabilities(test_logits, False).argmax(1) == probabilities(test_logits, False, 6.0).argmax(1)).all()


def test_calibration_off_keeps_temperature_one() -> None:
    logits, y = _calibrated_logits(200, seed=2)
    loader = DataLoader(TensorDataset(torch.tensor(logits, dtype=torch.float32), torch.tensor(y)), batch_size=64)
    spec = ClassifierSpec("cnn", "x", 32, ("a", "b", "c", "d"), False, (0, 0, 0), (1, 1, 1))
    assert calibrate_classifier(_Overconfident(), loader, spec, EvaluateConfig(calibrate=False), "cpu").temperature == 1


def test_multilabel_thresholds_maximise_validation_f1_and_fall_back_to_the_default() -> None:
    probs = np.array([[0.20, 0.9, 0.3], [0.30, 0.8, 0.2], [0.25, 0.7, 0.1], [0.10, 0.6, 0.4]])
    y = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]])
    t = choose_thresholds(probs, y, default=0.5, rule="max_f1")
    # Label 0: positives at 0.20-0.30, the negative at 0.10 -> any threshold in (0.10, 0.20] gives F1 = 1;
    # the tie goes to the one closest to 0.5, i.e. 0.20.
    assert t[0] == pytest.approx(0.20)
    # Label 1: positives 0.9, 0.8, negatives 0.7, 0.6 -> (0.7, 0.8] separates them; closest to 0.5 is 0.75.
    assert t[1] == pytest.approx(0.75)
    # Label 2: no positive in validation -> the default.
    assert t[2] == 0.5
    assert choose_thresholds(probs, y, default=0.4, rule="fixed") == (0.4, 0.4, 0.4)


def test_multilabel_metrics_at_per_label_thresholds_match_sklearn() -> None:
    from sklearn import metrics as skm

    from cass.metrics import classification_metrics

    rng = np.random.default_rng(5)
    y = (rng.random((120, 3)) < 0.4).astype(int)
    probs = np.clip(0.5 * y + 0.6 * rng.random((120, 3)), 0, 1)
    cut = (0.3, 0.5, 0.7)
    m = classification_metrics(y, probs, ["x", "y", "z"], multilabel=True, threshold=cut)
    pred = (probs >= np.array(cut)).astype(int)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert [m["per_class"][c]["threshold"] for c in "xyz"] == list(cut)
    assert "threshold" not in m  # one per label instead


def test_old_model_json_without_calibration_loads_uncalibrated(tmp_path: Path) -> None:
    old = {"network": "cnn", "arch": "test_resnet", "image_size": 32, "classes": ["a", "b"], "multilabel": False,
           "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2], "threshold": 0.5}
    (tmp_path / "model.json").write_text(json.dumps(old))
    spec = ClassifierSpec.from_file(tmp_path / "model.json")
    assert spec.temperature == 1.0 and spec.thresholds is None
    again = ClassifierSpec.from_file(_write(tmp_path / "new", spec.to_json()))
    assert again == spec


def _write(folder: Path, text: str) -> Path:
    folder.mkdir()
    (folder / "model.json").write_text(text)
    return folder / "model.json"


def test_model_gate_ece_ceiling(tmp_path: Path, tiny_params: Params) -> None:
    from cass.quality import validate_model

    metrics = {"macro_f1": 0.8, "balanced_accuracy": 0.8, "accuracy": 0.8, "macro_auroc": 0.9, "ece": 0.12,
               "per_class": {"a": {"recall": 0.9}, "b": {"recall": 0.8}}}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    assert validate_model(tiny_params, path, tmp_path / "none", raise_on_failure=False).success  # no ceiling set
    strict = tiny_params.model_copy(update={"quality": tiny_params.quality.model_copy(update={"max_ece": 0.05})})
    result = validate_model(strict, path, tmp_path / "strict", raise_on_failure=False)
    assert not result.success and [f.check for f in result.failures] == ["ece_ceiling"]
    assert "0.12" in result.failures[0].describe() and "0.05" in result.failures[0].describe()
    loose = tiny_params.model_copy(update={"quality": tiny_params.quality.model_copy(update={"max_ece": 0.2})})
    assert validate_model(loose, path, tmp_path / "loose", raise_on_failure=False).success
    path.write_text(json.dumps({k: v for k, v in metrics.items() if k != "ece"}))  # an older evaluation
    assert not validate_model(strict, path, tmp_path / "old", raise_on_failure=False).success


# --------------------------------------------------------------------------------------------------
# Evaluation and the served model apply the same calibration


def _saved_classifier(folder: Path, params: Params, *, multilabel: bool, temperature: float,
                      thresholds: tuple[float, ...] | None = None) -> Path:
    from cass.training import save_weights

    torch.manual_seed(3)
    spec = ClassifierSpec("cnn", "test_resnet", params.model.image_size, ("adipose", "lymphocytes", "stroma", "tumor"),
                          multilabel, params.augment.mean, params.augment.std, temperature=temperature,
                          thresholds=thresholds)
    folder.mkdir(parents=True)
    save_weights(spec.build(), folder / "model.safetensors")
    (folder / "model.json").write_text(spec.to_json())
    return folder


def test_served_probabilities_equal_evaluation_after_scaling(tmp_path: Path, tiny_params: Params,
                                                             prepared_dir: Path, monkeypatch) -> None:
    import mlflow

    from cass.data.manifest import read_manifest
    from cass.evaluate import evaluate
    from cass.serving import log_classifier

    model_dir = _saved_classifier(tmp_path / "model", tiny_params, multilabel=False, temperature=2.5)
    out = evaluate(tiny_params, prepared_dir, model_dir, tmp_path / "evaluate")
    metrics = json.loads(out.metrics.read_text())
    assert metrics["temperature"] == 2.5
    assert metrics["ece"] != pytest.approx(metrics["ece_before_scaling"])
    for name in ("reliability.png", "reliability.csv", "explanations.png", "class_counts.csv", "predictions.csv"):
        assert (out.out_dir / name).is_file(), name
    evaluated = pd.read_csv(out.predictions)

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("served", artifact_location=(tmp_path / "mlruns").as_uri())
        _, info = read_manifest(prepared_dir)
        paths = evaluated["path"].tolist()
        images = [(Path(info.root) / p).read_bytes() for p in paths]
        with mlflow.start_run(experiment_id=experiment):
            logged = log_classifier(model_dir, images[0])
        model = mlflow.pyfunc.load_model(logged.model_uri)
        served = model.predict(pd.DataFrame({"image": images}))
        assert model.metadata.metadata["temperature"] == 2.5
    finally:
        mlflow.set_tracking_uri(None)
    expected = evaluated[[f"p_{c}" for c in info.classes]].to_numpy()
    np.testing.assert_allclose(served[list(info.classes)].to_numpy(), expected, atol=2e-6)
    # ... and they are not the unscaled probabilities: the temperature was applied.
    raw = probabilities(np.log(np.clip(served[list(info.classes)].to_numpy(), 1e-12, 1)) * 2.5, False)
    assert not np.allclose(raw, expected, atol=1e-3)


def test_served_multilabel_model_decides_at_its_own_thresholds(tmp_path: Path, tiny_params: Params,
                                                               demo_root: Path) -> None:
    from cass.serving import ImageClassifier

    cut = (0.2, 0.4, 0.6, 0.8)
    folder = _saved_classifier(tmp_path / "ml", tiny_params, multilabel=True, temperature=0.5, thresholds=cut)
    served = ImageClassifier()
    served.load(folder)  # the classifier folder alone: load_context checks a whole MLflow model folder first
    images = [p.read_bytes() for p in sorted((demo_root / "stroma").glob("*.png"))[:4]]
    out = served.predict(None, pd.DataFrame({"image": images}))
    probs = out[list(served.spec.classes)].to_numpy()
    expected = ["|".join(c for c, p, t in zip(served.spec.classes, row, cut, strict=True) if p >= t) for row in probs]
    assert out["labels"].tolist() == expected


def test_calibration_settings_are_validated(demo_root: Path) -> None:
    from cass.errors import ConfigError
    from tests.conftest import tiny_mapping

    raw = tiny_mapping(demo_root)
    raw["evaluate"] = {"threshold_rule": "best"}
    with pytest.raises(ConfigError, match="threshold_rule"):
        params_from_mapping(raw)
    raw["evaluate"] = {"ece_bins": 1}
    with pytest.raises(ConfigError, match="ece_bins"):
        params_from_mapping(raw)
