"""Typed, validated, frozen settings loaded from ``params.yaml``.

``params.yaml`` is the single source of settings. Every stage receives a :class:`Params` object (or
one of its sections) explicitly; nothing reads the file behind the caller's back. Command-line
overrides (``--set pretrain.epochs=3``) are applied to the raw mapping and then validated by the same
schema, so a typo on the command line is rejected exactly like a typo in the file.

The sections are defined by concern (data, training, tuning, tracking and quality) in the ``cass.config_*``
modules; the metric and check names they validate against are in :mod:`cass.names`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError, model_validator

from cass.config_base import AUTO, NETWORKS, Network, Section
from cass.config_data import AugmentConfig, CsvLayout, DataConfig, DicomConfig, SplitConfig
from cass.config_study import StudyConfig
from cass.config_tracking import (
    CardConfig,
    EvaluateConfig,
    MlflowConfig,
    NotifyConfig,
    QualityConfig,
    RetrainConfig,
    metrics_fix,
)
from cass.config_training import (
    DinoConfig,
    FinetuneConfig,
    ModelConfig,
    PretrainConfig,
    TrainerConfig,
)
from cass.config_tuning import CategoricalSpec, FloatSpec, IntSpec, TuneConfig
from cass.data.layouts import get_layout
from cass.errors import ConfigError, did_you_mean
from cass.names import task_metrics, unwritten_metrics

# The settings API. Params and its loading are here; its sections are defined by concern in cass.config_base,
# config_data, config_training, config_tuning and config_tracking, and imported from here by their callers.
__all__ = [
    "NETWORKS", "AugmentConfig", "CardConfig", "CategoricalSpec", "CsvLayout", "DataConfig", "DicomConfig",
    "DinoConfig", "EvaluateConfig", "FinetuneConfig", "FloatSpec", "IntSpec", "MlflowConfig", "ModelConfig",
    "Network", "NotifyConfig", "Params", "PretrainConfig", "QualityConfig", "RetrainConfig", "SplitConfig",
    "StudyConfig", "TrainerConfig", "TuneConfig", "apply_overrides", "load_params", "params_from_mapping",
    "params_to_flat_dict", "parse_override", "pin_overridden", "read_params_file", "with_values",
]


class Params(Section):
    seed: int = 77
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    mlflow: MlflowConfig = MlflowConfig()
    quality: QualityConfig = QualityConfig()
    tune: TuneConfig = TuneConfig()
    retrain: RetrainConfig = RetrainConfig()
    card: CardConfig = CardConfig()
    study: StudyConfig = StudyConfig()

    @model_validator(mode="after")
    def _subgroups_for_gap(self) -> Params:
        if self.quality.max_subgroup_gap is not None and not self.data.group_columns:
            raise ValueError(
                "quality.max_subgroup_gap is set but data.group_columns is empty: name the subgroup columns "
                "(e.g. [site, sex]) or set max_subgroup_gap: null"
            )
        return self

    @model_validator(mode="after")
    def _fraction_listed(self) -> Params:
        for key, fraction in (
            ("finetune.label_fraction", self.finetune.label_fraction),
            ("pretrain.monitor_label_fraction", self.pretrain.monitor_label_fraction),
        ):
            if fraction is not None and fraction not in self.split.label_fractions:
                raise ValueError(
                    f"{key} {fraction} is not one of split.label_fractions "
                    f"{list(self.split.label_fractions)}; add it there so its subset file is written"
                )
        return self

    @model_validator(mode="after")
    def _derived(self) -> Params:
        """Resolve what the dataset implies: ``auto`` model names from its name, gate metrics from its task."""
        if self.mlflow.model_prefix == AUTO:
            self._set_derived("mlflow", model_prefix=f"cass-{self.data.name}")
        multilabel = get_layout(self.data.layout).multilabel(self.data)
        if self.quality.expected_metrics == AUTO:
            self._set_derived("quality", expected_metrics=task_metrics(multilabel))
        elif multilabel is not None and unwritten_metrics(self.quality.expected_metrics, multilabel):
            raise ValueError(metrics_fix(self.quality.expected_metrics, multilabel))
        return self

    def _set_derived(self, section: str, **values: Any) -> None:
        """Replace values of a section while validating; once validation returns, the object is frozen."""
        self.__dict__[section] = getattr(self, section).model_copy(update=values)


# --------------------------------------------------------------------------------------------------
# Loading and overrides


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section that ``loc`` points into."""
    current: type[BaseModel] = model
    for part in loc[:-1]:
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return []
        current = nxt
    return list(current.model_fields)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid settings"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(Params, loc)
            hint = did_you_mean(loc[-1], allowed)
            lines.append(f"  - {key}: unknown key{hint} Allowed keys here: {', '.join(allowed)}")
        else:
            got = e.get("input")
            got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  - {key}: {e['msg']}{got_txt}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as YAML (``3``, ``1e-3``, ``[cnn]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. pretrain.epochs=3")
    key, _, raw = text.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return parts, value


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``section.key=value`` of ``overrides`` set."""
    data: dict[str, Any] = _deep_copy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        _set(data, parts, value, f"override {text!r}")
    return data


def with_values(params: Params, values: Mapping[str, Any], source: str = "settings") -> Params:
    """``params`` with each ``section.key`` of ``values`` set, validated again (errors name ``source``)."""
    data = params.model_dump(mode="json")
    for key, value in values.items():
        _set(data, key.split("."), value, f"setting {key!r}")
    return params_from_mapping(data, source)


def _set(data: dict[str, Any], parts: list[str], value: Any, what: str) -> None:
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = {}
            node[p] = child
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: '{p}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def params_from_mapping(raw: Mapping[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def read_params_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: settings file not found; run from the project root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data:, pretrain:, ...)")
    return raw


def load_params(path: str | Path = "params.yaml", overrides: Iterable[str] = ()) -> Params:
    """Load ``params.yaml``, apply ``section.key=value`` overrides, validate; a searched finetune key that
    an override sets is pinned (:func:`pin_overridden`)."""
    overrides = list(overrides)
    raw = apply_overrides(read_params_file(path), overrides)
    source = f"{path}" + (f" with overrides {overrides}" if overrides else "")
    return pin_overridden(params_from_mapping(raw, source), overrides)


def pin_overridden(params: Params, overrides: Iterable[str]) -> Params:
    """``params`` with each key of ``tune.space`` that an override sets (``--set finetune.lr=3e-4``) added
    to ``tune.pin``: a value given explicitly is neither searched by ``cass tune`` nor replaced by a tuned one."""
    explicit = [parts for parts, _ in map(parse_override, overrides)]
    keys = [f"finetune.{p[1]}" for p in explicit if len(p) == 2 and p[0] == "finetune" and p[1] in params.tune.space]
    pin = tuple(dict.fromkeys((*params.tune.pin, *keys)))
    if pin == params.tune.pin:
        return params
    return params.model_copy(update={"tune": params.tune.model_copy(update={"pin": pin})})


def params_to_flat_dict(params: Params) -> dict[str, Any]:
    """Flat ``section.key`` -> value mapping (MLflow params, DVC-like views)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(f"{prefix}.{name}" if prefix else name, getattr(value, name))
        else:
            flat[prefix] = list(value) if isinstance(value, tuple) else value

    walk("", params)
    return flat
