"""Objectives: the CASS loss and focal loss."""

from cass.losses.cass import CASSLoss, embedding_std
from cass.losses.focal import FocalLoss, class_weights

__all__ = ["CASSLoss", "FocalLoss", "class_weights", "embedding_std"]
