"""Objectives: the CASS loss, focal loss, the DINO baseline's loss, and the terms of the CASS variants
(variance-covariance, cross-architecture prediction)."""

from cass.losses.cass import CASSLoss, EmbeddingSpread, embedding_std
from cass.losses.dino import DINOLoss
from cass.losses.focal import FocalLoss, class_weights
from cass.losses.prediction import CrossPredictionLoss
from cass.losses.vicreg import AntiCollapseCASSLoss, VarianceCovarianceLoss

__all__ = [
    "AntiCollapseCASSLoss",
    "CASSLoss",
    "CrossPredictionLoss",
    "DINOLoss",
    "EmbeddingSpread",
    "FocalLoss",
    "VarianceCovarianceLoss",
    "class_weights",
    "embedding_std",
]
