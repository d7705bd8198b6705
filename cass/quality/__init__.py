"""Data-quality and model gates built on Great Expectations (GX Core 1.x).

Three gates, each a stage function that the CLI (``cass validate ...``), DVC and Prefect call: the manifest
gate before any training, the split gate before fine-tuning, the model gate before registration and
promotion. Each returns a :class:`GateResult` and raises :class:`cass.errors.GateFailed` when a check of
severity "fail" failed. Great Expectations is imported only when a gate runs.
"""

from cass.quality.gate import Finding, GateResult
from cass.quality.manifest_suite import validate_manifest
from cass.quality.model_suite import validate_model
from cass.quality.split_suite import validate_splits

__all__ = ["Finding", "GateResult", "validate_manifest", "validate_model", "validate_splits"]
