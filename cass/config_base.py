"""What every settings section shares: the frozen, strict base class, the networks and ``auto``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Network = Literal["cnn", "vit"]
"""The two networks CASS pretrains together: the CNN and the Vision Transformer."""
NETWORKS: tuple[Network, ...] = ("cnn", "vit")

AUTO = "auto"
"""A setting the dataset implies (model names from its name, gate metrics from its task), resolved by Params."""

class Section(BaseModel):
    """A section of ``params.yaml``: unknown keys refused, frozen, no inf or nan."""

    # No setting can train with inf or nan (finetune.lr=.inf used to pass and fail at epoch 2).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
