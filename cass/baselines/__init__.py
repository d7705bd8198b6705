"""Baselines CASS is compared with. The supervised-only baseline needs no module: it is fine-tuning
from random initialisation (``finetune.init: random``)."""
