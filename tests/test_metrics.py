"""Our metrics against scikit-learn's, on random predictions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from cass.metrics import binary_auroc, classification_metrics
from tests.conftest import noisy_classifier


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_label_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k, n = 4, 200
    y, probs = noisy_classifier(rng, n, k, 1.5)
    pred = probs.argmax(1)
    m = classification_metrics(y, probs, ["a", "b", "c", "d"], multilabel=False)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["macro_auroc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=range(k)).tolist()
    recalls = skm.recall_score(y, pred, average=None, zero_division=0)
    precisions = skm.precision_score(y, pred, average=None, zero_division=0)
    for i, c in enumerate("abcd"):
        assert m["per_class"][c]["recall"] == pytest.approx(recalls[i])
        assert m["per_class"][c]["precision"] == pytest.approx(precisions[i])


def test_f1_is_not_recall() -> None:
    # The public notebook's "F1" was recall; here they differ whenever precision != recall.
    y = np.array([0, 0, 0, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.2, 0.8], [0.1, 0.9]])
    m = classification_metrics(y, probs, ["a", "b"], multilabel=False)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, probs.argmax(1), average="macro"))
    assert m["macro_f1"] != pytest.approx(m["balanced_accuracy"])


def test_multilabel_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random((150, 3)) < 0.4).astype(int)
    probs = np.clip(0.5 * y + 0.6 * rng.random((150, 3)), 0, 1)
    m = classification_metrics(y, probs, ["x", "y", "z"], multilabel=True, threshold=0.5)
    pred = (probs >= 0.5).astype(int)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    for i, c in enumerate("xyz"):
        assert m["per_class"][c]["auroc"] == pytest.approx(skm.roc_auc_score(y[:, i], probs[:, i]))
        assert m["per_class"][c]["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y[:, i], pred[:, i]))


def test_auroc_with_ties_and_single_class() -> None:
    y = np.array([0, 1, 0, 1, 1])
    s = np.array([0.5, 0.5, 0.2, 0.9, 0.5])
    assert binary_auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    assert np.isnan(binary_auroc(np.ones(3), np.array([0.1, 0.2, 0.3])))
