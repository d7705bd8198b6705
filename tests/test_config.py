"""Settings: params.yaml is validated strictly, and overrides go through the same validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from cass.config import apply_overrides, load_params, params_from_mapping, params_to_flat_dict, read_params_file
from cass.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_yaml_loads() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.model.cnn == "test_resnet"
    assert params.finetune.label_fraction in params.split.label_fractions


def test_settings_are_frozen() -> None:
    params = params_from_mapping({})
    with pytest.raises(Exception, match="frozen"):
        params.pretrain.epochs = 3  # type: ignore[misc]


def test_unknown_key_is_rejected_with_suggestion_and_allowed_keys() -> None:
    with pytest.raises(ConfigError) as err:
        params_from_mapping({"pretrain": {"epoch": 3}})
    text = str(err.value)
    assert "pretrain.epoch: unknown key" in text
    assert "did you mean 'epochs'" in text
    assert "batch_size" in text  # the allowed keys are listed


def test_invalid_choice_names_key_and_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        params_from_mapping({"pretrain": {"optimizer": "sgd"}})
    text = str(err.value)
    assert "pretrain.optimizer" in text and "'adam'" in text and "'adamw'" in text and "'sgd'" in text


def test_out_of_range_value_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"split.test"):
        params_from_mapping({"split": {"test": 1.5}})


def test_overrides_are_applied_and_validated(tmp_path: Path) -> None:
    f = tmp_path / "params.yaml"
    f.write_text("pretrain:\n  epochs: 5\n")
    params = load_params(f, ["pretrain.epochs=3", "finetune.networks=[cnn]", "model.cnn_weights=null"])
    assert params.pretrain.epochs == 3
    assert params.finetune.networks == ("cnn",)
    with pytest.raises(ConfigError, match="pretrain.epochz: unknown key"):
        load_params(f, ["pretrain.epochz=3"])
    with pytest.raises(ConfigError, match="pretrain.epochs"):
        load_params(f, ["pretrain.epochs=zero"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_params(f, ["pretrain.epochs"])


def test_label_fraction_must_have_a_subset() -> None:
    with pytest.raises(ConfigError, match="finetune.label_fraction 0.5 is not one of split.label_fractions"):
        params_from_mapping({"finetune": {"label_fraction": 0.5}})


def test_missing_file_and_bad_yaml_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="settings file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_flat_dict_has_dotted_keys() -> None:
    flat = params_to_flat_dict(params_from_mapping({}))
    assert flat["pretrain.lr"] == 1e-3
    assert flat["model.cnn"] == "resnet50"
    assert flat["split.label_fractions"] == [0.01, 0.1, 1.0]


FLOAT_KEYS = ["finetune.lr", "pretrain.min_lr", "pretrain.anti_collapse_weight", "evaluate.threshold"]


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "nan"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_numbers_are_rejected_in_every_setting(key: str, value: str) -> None:
    # Guards: a non-finite number passed validation and stopped training later with a non-finite loss.
    with pytest.raises(ConfigError) as err:
        load_params(ROOT / "params.yaml", [f"{key}={value}"])
    assert key in str(err.value) and "finite" in str(err.value)


# --------------------------------------------------------------------------------------------------
# Settings the dataset implies (issue 18)


def test_registered_model_names_follow_the_dataset_unless_set() -> None:
    assert params_from_mapping({}).mlflow.model_prefix == "cass-demo"
    assert params_from_mapping({"data": {"name": "autoimmune"}}).mlflow.model_prefix == "cass-autoimmune"
    shipped = read_params_file(ROOT / "params.yaml")
    raw = apply_overrides(shipped, ["data.name=isic2019"])
    assert params_from_mapping(raw).mlflow.model_prefix == "cass-isic2019"  # the shipped file follows the name
    assert params_from_mapping(raw).mlflow.model_prefix != params_from_mapping(shipped).mlflow.model_prefix
    fixed = {"data": {"name": "isic2019"}, "mlflow": {"model_prefix": "skin"}}
    assert params_from_mapping(fixed).mlflow.model_prefix == "skin"


MULTILABEL_CSV = ["data.layout=csv", "data.csv.file=labels.csv", "data.csv.multilabel=true"]


def test_expected_metrics_follow_the_task() -> None:
    single = load_params(ROOT / "params.yaml")
    multi = load_params(ROOT / "params.yaml", MULTILABEL_CSV)  # the shipped file, pointed at multi-label data
    assert "accuracy" in single.quality.expected_metrics and "exact_match" not in single.quality.expected_metrics
    assert "exact_match" in multi.quality.expected_metrics and "accuracy" not in multi.quality.expected_metrics
    medmnist = params_from_mapping({"data": {"layout": "medmnist", "medmnist_file": "x.npz"}})
    assert medmnist.quality.expected_metrics == ("macro_f1", "balanced_accuracy", "macro_auroc")  # task unknown yet


def test_a_metric_the_task_never_writes_is_refused_with_the_value_to_set() -> None:
    with pytest.raises(ConfigError) as err:
        load_params(ROOT / "params.yaml", [*MULTILABEL_CSV, "quality.expected_metrics=[macro_f1,accuracy]"])
    text = str(err.value)
    assert "quality.expected_metrics lists ['accuracy']" in text and "multi-label" in text
    assert "set quality.expected_metrics: auto (here ['macro_f1', 'balanced_accuracy', 'exact_match'" in text
    with pytest.raises(ConfigError, match="unknown metric 'macrof1'; did you mean 'macro_f1'"):
        params_from_mapping({"quality": {"expected_metrics": ["macrof1"]}})


def test_shipped_params_accept_grayscale_16_bit_and_rgba_images() -> None:
    modes = load_params(ROOT / "params.yaml").quality.allowed_modes
    assert {"RGB", "L", "I;16", "I", "RGBA"} <= set(modes)


def test_task_metric_lists_match_what_evaluation_writes() -> None:
    """`auto` may only require metrics evaluation writes: each list must stay in step with cass.metrics."""
    import numpy as np

    from cass.metrics import classification_metrics
    from cass.names import MULTI_LABEL_METRICS, SINGLE_LABEL_METRICS

    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    single = classification_metrics(np.array([0, 1, 1, 1]), probs, ["a", "b"], multilabel=False)
    multi = classification_metrics(np.array([[1, 0], [0, 1], [1, 1], [0, 1]]), probs, ["a", "b"], multilabel=True)
    for metrics, names in ((single, SINGLE_LABEL_METRICS), (multi, MULTI_LABEL_METRICS)):
        written = {k for k, v in metrics.items() if isinstance(v, float) and 0.0 <= v <= 1.0}
        assert set(names) <= written, f"{names} not all written: {sorted(written)}"
