"""Settings of ``cass tune``: the search space over fine-tuning settings, the pruner and the study."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from cass.config_base import Section
from cass.config_training import FinetuneConfig
from cass.errors import did_you_mean


class FloatSpec(Section):
    """A float drawn from [low, high], on a log scale when ``log`` (learning rates, weight decay)."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(default=None, gt=0.0, description="grid step; not with log")


class IntSpec(Section):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(default=1, ge=1)


class CategoricalSpec(Section):
    type: Literal["categorical"]
    choices: tuple[bool | int | float | str | None, ...]


SearchSpec = Annotated[FloatSpec | IntSpec | CategoricalSpec, Field(discriminator="type")]

TUNABLE_FINETUNE_KEYS = (
    "lr",
    "min_lr",
    "weight_decay",
    "warmup_epochs",
    "optimizer",
    "focal_gamma",
    "focal_alpha",
    "class_weights",
    "batch_size",
    "accumulate",
    "freeze_epochs",
    "augment_strength",
    "patience",
)
"""finetune.* keys a study may search. The rest choose what is trained (networks, init, label_fraction)
or where (device, workers): searching them would compare different experiments, not settings."""


def _default_space() -> dict[str, FloatSpec | IntSpec | CategoricalSpec]:
    return {
        "lr": FloatSpec(type="float", low=1e-5, high=1e-2, log=True),
        "weight_decay": FloatSpec(type="float", low=1e-6, high=1e-2, log=True),
        "focal_gamma": FloatSpec(type="float", low=0.0, high=3.0),
        "class_weights": CategoricalSpec(type="categorical", choices=("inverse_frequency", "authors", "none")),
        "batch_size": CategoricalSpec(type="categorical", choices=(8, 16, 32)),
        "freeze_epochs": IntSpec(type="int", low=0, high=2),
        "augment_strength": FloatSpec(type="float", low=0.5, high=1.5),
    }


def _check_search_param(name: str, spec: FloatSpec | IntSpec | CategoricalSpec) -> None:
    """Reject one entry of tune.space that no trial could use, naming it."""
    key = f"tune.space.{name}"
    fields = FinetuneConfig.model_fields
    if name not in fields:
        raise ValueError(
            f"{key}: '{name}' is not a finetune setting{did_you_mean(name, TUNABLE_FINETUNE_KEYS)} Tunable: "
            f"{', '.join(TUNABLE_FINETUNE_KEYS)}"
        )
    if name not in TUNABLE_FINETUNE_KEYS:
        raise ValueError(f"{key}: finetune.{name} cannot be tuned; tunable: {', '.join(TUNABLE_FINETUNE_KEYS)}")
    annotation = fields[name].annotation
    if isinstance(spec, CategoricalSpec):
        if not spec.choices:
            raise ValueError(f"{key}: the choice list is empty; give at least one value")
        values: tuple[Any, ...] = spec.choices
    else:
        if spec.low > spec.high:
            raise ValueError(f"{key}: low ({spec.low}) is greater than high ({spec.high})")
        if spec.log and spec.low <= 0:
            raise ValueError(f"{key}: a log scale needs low > 0 (got {spec.low})")
        fixed_grid = spec.step is not None if isinstance(spec, FloatSpec) else spec.step != 1
        if spec.log and fixed_grid:
            raise ValueError(f"{key}: use either log or step, not both")
        if annotation is int and isinstance(spec, FloatSpec):
            raise ValueError(f"{key}: finetune.{name} is a whole number; use type: int or categorical")
        if annotation not in (int, float):
            raise ValueError(f"{key}: finetune.{name} takes named values; use type: categorical with choices")
        values = (spec.low, spec.high)
    for value in values:
        try:
            FinetuneConfig.model_validate({name: value})
        except ValidationError as err:
            reason = "; ".join(e["msg"] for e in err.errors())
            raise ValueError(f"{key}: {value!r} is not a valid finetune.{name} ({reason})") from None


class PrunerConfig(Section):
    """Stops a trial early when its per-epoch validation value trails the other trials at that epoch."""

    type: Literal["median", "percentile", "none"] = "median"
    n_startup_trials: int = Field(default=5, ge=0, description="finished trials before any pruning")
    n_warmup_steps: int = Field(default=1, ge=0, description="epochs of a trial that are never pruned")
    percentile: float = Field(default=50.0, gt=0.0, lt=100.0, description="percentile pruner: keep the top share")


class TuneConfig(Section):
    """Optuna search over fine-tuning settings (``cass tune``). ``space`` maps finetune keys to ranges."""

    enabled: bool = Field(
        default=True, description="the pipeline tunes before fine-tuning (dvc.yaml, the flow); --tune-trials 0 or N "
        "overrides it for one run; `cass dvc-yaml` rewrites dvc.yaml after a change"
    )
    n_trials: int = Field(default=20, ge=1, description="finished trials the study aims at, over all workers")
    timeout: float | None = Field(default=None, gt=0.0, description="seconds after which a worker starts no trial")
    seed: int | None = Field(default=None, description="sampler seed; default: the top-level seed")
    objective: Literal["val_macro_f1", "val_balanced_accuracy", "val_loss"] = "val_macro_f1"
    direction: Literal["maximize", "minimize"] | None = Field(
        default=None, description="default: minimize for val_loss, else maximize"
    )
    epochs: int | None = Field(default=None, ge=1, description="epochs per trial; default: finetune.epochs")
    startup_trials: int = Field(default=10, ge=0, description="random trials before TPE models the space")
    pruner: PrunerConfig = PrunerConfig()
    storage: str | None = Field(
        default=None, description="sqlite:///... or postgresql://...; default: <outputs>/tune/optuna_<net>.db"
    )
    study_name: str = Field(default="cass-finetune", min_length=1, description="one study per network: <name>-<net>")
    heartbeat_interval: int = Field(default=60, ge=1, description="seconds between a running trial's heartbeats")
    grace_period: int | None = Field(
        default=None, ge=1, description="silence after which a trial's worker counts as dead; default 2 x heartbeat"
    )
    max_retry: int = Field(default=3, ge=0, description="re-runs of a trial whose worker died")
    space: dict[str, SearchSpec] = Field(default_factory=_default_space)
    pin: tuple[str, ...] = Field(
        default=(), description="finetune keys that keep their value: not searched, not taken from --best-params"
    )

    @field_validator("pin", mode="before")
    @classmethod
    def _one_or_more(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v

    @field_validator("pin")
    @classmethod
    def _pinned_keys(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        keys = []
        for entry in v:
            name = entry.removeprefix("finetune.")
            if name not in TUNABLE_FINETUNE_KEYS:
                raise ValueError(
                    f"tune.pin: '{entry}' is not a tunable finetune setting"
                    f"{did_you_mean(name, TUNABLE_FINETUNE_KEYS) or '.'} Tunable (as finetune.<key>): "
                    f"{', '.join(TUNABLE_FINETUNE_KEYS)}"
                )
            keys.append(f"finetune.{name}")
        return tuple(dict.fromkeys(keys))

    @field_validator("space", mode="before")
    @classmethod
    def _typed(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            for name, spec in v.items():
                if isinstance(spec, Mapping) and spec.get("type") not in ("float", "int", "categorical"):
                    raise ValueError(
                        f"tune.space.{name}: set type: float, int or categorical (got {spec.get('type')!r}), "
                        "e.g. {type: float, low: 1.0e-5, high: 1.0e-2, log: true}"
                    )
        return v

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, FloatSpec | IntSpec | CategoricalSpec]) -> dict:
        if not v:
            raise ValueError("tune.space is empty; give at least one finetune key to search, e.g. lr")
        for name, spec in v.items():
            _check_search_param(name, spec)
        return v

    @model_validator(mode="after")
    def _settings(self) -> TuneConfig:
        natural = "minimize" if self.objective == "val_loss" else "maximize"
        if self.direction is not None and self.direction != natural:
            raise ValueError(
                f"tune.direction '{self.direction}' does not fit tune.objective {self.objective}: "
                f"it should be {natural}d; leave tune.direction unset"
            )
        if self.grace_period is not None and self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"tune.grace_period ({self.grace_period}) must exceed tune.heartbeat_interval "
                f"({self.heartbeat_interval}), or a live worker's trial is taken for dead"
            )
        return self

    @property
    def study_direction(self) -> Literal["maximize", "minimize"]:
        return self.direction or ("minimize" if self.objective == "val_loss" else "maximize")

    @property
    def pinned(self) -> frozenset[str]:
        """The ``finetune`` keys (without the section) that tuning leaves alone."""
        return frozenset(key.removeprefix("finetune.") for key in self.pin)

    @property
    def searched(self) -> dict[str, SearchSpec]:
        """``space`` without the pinned keys: what a trial draws."""
        return {name: spec for name, spec in self.space.items() if name not in self.pinned}
