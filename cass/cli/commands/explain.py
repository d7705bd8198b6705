"""`cass explain`: heat maps of what a registered model (or a fine-tuning folder) looks at (cass.explain)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cass.cli.settings import settings


def explain(args: argparse.Namespace) -> int:
    """Write one overlay per image: the image beside its heat map for the predicted class."""
    from cass.explain import explain_files
    from cass.tracking import configure_client

    params = settings(args)
    if not Path(args.model).is_dir():
        configure_client(params.mlflow)
    for path in explain_files(args.model, list(args.images), args.out, params.evaluate.vit_explainer):
        print(path)
    return 0
