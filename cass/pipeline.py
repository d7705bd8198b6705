"""The stages in order, with one output layout shared by the CLI, DVC and the Prefect flow."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from cass.config import Params
from cass.data.demo import generate_demo
from cass.data.prepare import prepare_data
from cass.evaluate import evaluate
from cass.finetune import finetune
from cass.layout import Layout
from cass.pretrain import pretrain
from cass.quality import validate_manifest, validate_model, validate_splits

log = logging.getLogger(__name__)

def ensure_demo_data(params: Params) -> None:
    """Generate the embedded demo dataset at ``data.root`` when the settings point at it."""
    if params.data.name == "demo" and params.data.layout == "imagefolder":
        generate_demo(Path(params.data.root), params.data.demo_images_per_class, params.data.demo_image_size)


def validate_data(params: Params, layout: Layout, on_stage: Callable[[str], None] = lambda stage: None) -> None:
    """The data gates, manifest then splits; :class:`cass.errors.GateFailed` stops the run before any training.

    Both run before pretraining (not only the split gate before fine-tuning): pretraining reads the splits too.
    """
    on_stage("validate manifest")
    validate_manifest(params, layout.data, layout.quality("manifest"), cache_path=layout.decode_cache)
    on_stage("validate splits")
    validate_splits(params, layout.data, layout.quality("splits"))


def run_pipeline(
    params: Params,
    layout: Layout = Layout(),
    *,
    progress: bool = True,
    on_stage: Callable[[str], None] = lambda stage: None,
) -> dict[str, dict]:
    """prepare -> pretrain -> fine-tune and evaluate each network; returns test metrics per network.

    Untracked; :func:`cass.tracking.tracked_pipeline` and the Prefect flow run the same stages with MLflow.
    """
    on_stage("prepare")
    ensure_demo_data(params)
    prepare_data(params, layout.data)
    validate_data(params, layout, on_stage)
    pre_dir = None
    if params.finetune.init == "cass":
        on_stage("pretrain")
        pre_dir = pretrain(params, layout.data, layout.pretrain, progress=progress).out_dir
    results = {}
    for network in params.finetune.networks:
        on_stage(f"finetune {network}")
        model_dir = finetune(params, layout.data, network, layout.finetune(network), pre_dir, progress=progress).out_dir
        on_stage(f"evaluate {network}")
        metrics_path = evaluate(params, layout.data, model_dir, layout.evaluate(network)).metrics
        results[network] = json.loads(metrics_path.read_text())
        # Reported only: the demo registers nothing; registration and promotion stop on this gate.
        gate = validate_model(params, metrics_path, layout.quality("model") / network, raise_on_failure=False)
        if not gate.success:
            log.warning("%s", gate.summary())
    return results
