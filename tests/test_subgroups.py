"""Subgroup metrics against scikit-learn, the groups file, the worst-group gap, its gate and the demo's groups."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from cass.config import Params, params_from_mapping
from cass.errors import ConfigError, DataError
from cass.subgroups import ALL, MISSING, read_groups, subgroup_table, worst_group_gap
from tests.conftest import LENIENT_MODEL_GATE, noisy_classifier, tiny_mapping


@pytest.mark.parametrize("seed", [0, 1])
def test_subgroup_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = 300, 4
    y, probs = noisy_classifier(rng, n, k, 2.0)
    pred = probs.argmax(1)
    groups = pd.DataFrame({"site": rng.choice(["A", "B", "C"], n), "sex": rng.choice(["F", "M"], n)})
    groups.loc[:4, "site"] = "D"  # a small group: listed, not counted
    table = subgroup_table(y, probs, groups, multilabel=False, thresholds=0.5, min_size=10)
    for row in table.itertuples():
        inside = np.ones(n, bool) if row.column == ALL else (groups[row.column] == row.group).to_numpy()
        assert row.images == inside.sum()
        assert row.macro_f1 == pytest.approx(skm.f1_score(y[inside], pred[inside], average="macro", zero_division=0))
        assert row.balanced_accuracy == pytest.approx(skm.balanced_accuracy_score(y[inside], pred[inside]))
    assert not table[(table["column"] == "site") & (table["group"] == "D")]["counted"].item()

    gap = worst_group_gap(table)
    counted = table[table["counted"]]
    overall = table[table["column"] == ALL].iloc[0]
    assert gap["subgroup_gap_balanced_accuracy"] == pytest.approx(
        max(0.0, overall["balanced_accuracy"] - counted["balanced_accuracy"].min()))
    assert gap["subgroup_gap"] == max(gap["subgroup_gap_macro_f1"], gap["subgroup_gap_balanced_accuracy"])
    assert gap["subgroups_counted"] == len(counted) == 5  # A, B, C, F, M


def test_multilabel_subgroups_match_sklearn() -> None:
    rng = np.random.default_rng(4)
    y = (rng.random((200, 3)) < 0.4).astype(int)
    probs = np.clip(0.5 * y + 0.6 * rng.random((200, 3)), 0, 1)
    groups = pd.DataFrame({"scanner": rng.choice(["s1", "s2"], 200)})
    cut = (0.4, 0.5, 0.6)
    table = subgroup_table(y, probs, groups, multilabel=True, thresholds=cut, min_size=10)
    pred = (probs >= np.array(cut)).astype(int)
    for value in ("s1", "s2"):
        inside = (groups["scanner"] == value).to_numpy()
        row = table[table["group"] == value].iloc[0]
        assert row.macro_f1 == pytest.approx(skm.f1_score(y[inside], pred[inside], average="macro", zero_division=0))
        baccs = [skm.balanced_accuracy_score(y[inside, j], pred[inside, j]) for j in range(3)]
        assert row.balanced_accuracy == pytest.approx(np.mean(baccs))


def _params(root: Path, **data) -> Params:
    raw = tiny_mapping(root)
    raw["data"].update(data)
    return params_from_mapping(raw)


def test_groups_are_matched_by_path_or_by_file_name(tmp_path: Path) -> None:
    (tmp_path / "groups.csv").write_text("image,site\nimg_1,A\nb/img_2.png,B\nimg_3,\n")
    params = _params(tmp_path, group_columns=["site"], groups_file="groups.csv", groups_key="image")
    groups = read_groups(params, ["a/img_1.png", "b/img_2.png", "c/img_3.png", "c/unknown.png"])
    assert groups["site"].tolist() == ["A", "B", MISSING, MISSING]


def test_groups_file_problems_are_named(tmp_path: Path) -> None:
    params = _params(tmp_path, group_columns=["site"], groups_file="groups.csv")
    with pytest.raises(DataError, match="groups file not found"):
        read_groups(params, ["a.png"])
    (tmp_path / "groups.csv").write_text("path,scanner\na.png,X\n")
    with pytest.raises(DataError, match=r"no column\(s\) \['site'\]"):
        read_groups(params, ["a.png"])
    (tmp_path / "groups.csv").write_text("path,site\na.png,X\na.png,Y\n")
    with pytest.raises(DataError, match="repeats"):
        read_groups(params, ["a.png"])
    (tmp_path / "groups.csv").write_text("path,site\nz.png,X\n")
    with pytest.raises(DataError, match="data.groups_key"):
        read_groups(params, ["a.png"])


def test_group_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.groups_file"):
        _params(tmp_path, group_columns=["site"])  # imagefolder has no CSV of its own
    raw = tiny_mapping(tmp_path)
    raw["quality"] = {"max_subgroup_gap": 0.1}
    with pytest.raises(ConfigError, match="data.group_columns is empty"):
        params_from_mapping(raw)


def test_demo_data_records_each_images_focus_and_patch(demo_root: Path) -> None:
    table = pd.read_csv(demo_root / "metadata.csv")
    images = sorted(p.relative_to(demo_root).as_posix() for p in demo_root.rglob("*.png"))
    assert sorted(table["path"]) == images
    assert set(table["focus"]) == {"sharp", "blurred"} and set(table["patch"]) == {"pure", "mixed"}


def test_evaluate_writes_subgroups_and_the_gate_reads_the_gap(tmp_path: Path, demo_root: Path,
                                                               prepared_dir: Path) -> None:
    import torch

    from cass.classifier import ClassifierSpec
    from cass.evaluate import evaluate
    from cass.quality import validate_model
    from cass.training import save_weights

    params = _params(demo_root, group_columns=["focus", "patch"], groups_file="metadata.csv")
    torch.manual_seed(0)
    spec = ClassifierSpec("cnn", "test_resnet", 32, ("adipose", "lymphocytes", "stroma", "tumor"), False,
                          params.augment.mean, params.augment.std)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_weights(spec.build(), model_dir / "model.safetensors")
    (model_dir / "model.json").write_text(spec.to_json())
    params = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"min_subgroup_size": 2,
                                                                                       "explain_per_class": 0})})
    out = evaluate(params, prepared_dir, model_dir, tmp_path / "evaluate")
    table = pd.read_csv(out.subgroups, keep_default_na=False)
    assert set(table["column"]) == {ALL, "focus", "patch"}
    assert table[table["column"] == ALL]["images"].item() == table[table["column"] == "focus"]["images"].sum()
    metrics = json.loads(out.metrics.read_text())
    assert 0.0 <= metrics["subgroup_gap"] <= 1.0
    assert not out.explanations.exists()

    lenient = {**LENIENT_MODEL_GATE, "max_subgroup_gap": 0.2}  # an untrained network: only the gap decides
    strict = params.model_copy(update={"quality": params.quality.model_copy(update=lenient)})
    metrics["subgroup_gap"] = 0.25
    out.metrics.write_text(json.dumps(metrics))
    result = validate_model(strict, out.metrics, tmp_path / "gate", raise_on_failure=False)
    assert [f.check for f in result.failures] == ["subgroup_gap_ceiling"]
