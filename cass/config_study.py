"""Settings of ``cass study``: the label-efficiency study of the configured dataset (cass.study, docs/study.md)."""

from __future__ import annotations

from pydantic import Field, model_validator

from cass.config_base import NETWORKS, Network, Section


class StudyConfig(Section):
    """``cass study``: a label-efficiency study of this dataset (cass.study, docs/study.md): each method x label
    fraction x seed x network through the stages, the decision rule, a report and a recommendation."""

    methods: tuple[str, ...] = Field(
        default=("no pretraining", "CASS", "CASS simsiam + vicreg"),
        description="named recipes of cass.study.methods.METHODS (no pretraining, CASS, CASS simsiam, DINO, ...)")
    fractions: tuple[float, ...] = Field(default=(0.1, 1.0), description="label fractions (in split.label_fractions)")
    seeds: tuple[int, ...] = Field(default=(1, 2, 3), description="training seeds; the split stays split.seed's")
    networks: tuple[Network, ...] = NETWORKS
    baseline: str = Field(default="no pretraining", description="the method every other is paired against")
    decision_fraction: float | None = Field(default=None, description="fraction the rule decides at; null: smallest")
    min_effect: float = Field(default=0.02, gt=0.0, description="smallest macro F1 gain worth finding (test size)")
    parallel: int = Field(default=1, ge=1, description="cells trained at the same time by the flow's task runner")
    recommendations: str = Field(
        default="outputs/study/recommendations",
        description="where studies record their recommendation per data version (read by pretrain.variant: auto)")

    @model_validator(mode="after")
    def _consistent(self) -> StudyConfig:
        if self.baseline not in self.methods:
            raise ValueError(f"study.baseline {self.baseline!r} is not one of study.methods {list(self.methods)}")
        if self.decision_fraction is not None and self.decision_fraction not in self.fractions:
            raise ValueError(f"study.decision_fraction {self.decision_fraction} is not one of study.fractions "
                             f"{list(self.fractions)}")
        if not self.seeds or not self.fractions or not self.networks:
            raise ValueError("study.seeds, study.fractions and study.networks need at least one value each")
        return self
