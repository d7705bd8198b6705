"""The methods a study compares: each one a named set of settings changes on the user's settings.

The CASS variants are ``pretrain.variant`` values of the one CASS stage (:mod:`cass.variants`); DINO is
``pretrain.method: dino``; no pretraining fine-tunes from the networks' start (``finetune.init: random``).
"""

from __future__ import annotations

import re
from typing import Any

from cass.errors import ConfigError

NO_PRETRAINING = "no pretraining"


def _cass(variant: str, vicreg_weight: float | None = None) -> dict[str, Any]:
    changes: dict[str, Any] = {"pretrain.method": "cass", "pretrain.variant": variant, "pretrain.anti_collapse": "none"}
    if vicreg_weight is not None:
        changes.update({"pretrain.anti_collapse": "vicreg", "pretrain.anti_collapse_weight": vicreg_weight})
    return changes


METHODS: dict[str, dict[str, Any]] = {
    "CASS": _cass("paper"),
    "DINO": {"pretrain.method": "dino"},
    "CASS + anti-collapse": _cass("paper", 1.0),
    NO_PRETRAINING: {},
    "CASS + vicreg 25": _cass("paper", 25.0),
    "CASS projector": _cass("projector"),
    "CASS projector + vicreg 25": _cass("projector", 25.0),
    "CASS simsiam": _cass("simsiam"),
    "CASS simsiam + vicreg": _cass("simsiam", 1.0),
    "CASS byol": _cass("byol"),
    "CASS byol + vicreg": _cass("byol", 1.0),
    "CASS byol + strong views": {**_cass("byol"), "augment.recipe": "strong"},
    "CASS simsiam + strong views": {**_cass("simsiam"), "augment.recipe": "strong"},
}
"""Every named method; ``study.methods`` picks some."""


def pretrains(method: str) -> bool:
    return method != NO_PRETRAINING


def changes(method: str) -> dict[str, Any]:
    """The settings of ``method``: its recipe and how fine-tuning starts."""
    check_methods([method])
    return {**METHODS[method], "finetune.init": "cass" if pretrains(method) else "random"}


def check_methods(names: list[str] | tuple[str, ...]) -> None:
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ConfigError(f"study.methods: unknown method(s) {unknown}; known: {', '.join(METHODS)}")


def slug(method: str) -> str:
    """A folder name for ``method`` ("CASS simsiam + vicreg" -> "cass-simsiam-vicreg")."""
    return re.sub(r"[^a-z0-9]+", "-", method.lower()).strip("-")
