"""Settings: params.yaml is validated strictly, and overrides go through the same validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from cass.config import load_params, params_from_mapping, params_to_flat_dict
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
