"""Secrets never reach MLflow: URI passwords, secret query parameters and secret-looking settings are
replaced by ``***`` before anything is logged (params, tags, params.yaml, quality reports, messages).
The rule for text is :func:`cass.redaction.redact`, re-exported here."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from cass.config import Params, params_to_flat_dict
from cass.redaction import REDACTED, redact

__all__ = ["REDACTED", "loggable_params", "redact", "redact_mapping", "redact_yaml_text"]

_SECRET_WORDS = r"(password|passwd|secret|token|api[_-]?key|access[_-]?key|credential)"
_SECRET_KEY = re.compile(_SECRET_WORDS, re.IGNORECASE)
_YAML_SECRET_LINE = re.compile(
    r"^(?P<head>[ \t-]*[\w.-]*" + _SECRET_WORDS + r"[\w.-]*[ \t]*:[ \t]*)"
    r"(?P<value>\"[^\"\n]*\"|'[^'\n]*'|[^#\n]*[^#\s])",
    re.IGNORECASE | re.MULTILINE,
)


def redact_mapping(values: Mapping[str, Any]) -> dict[str, Any]:
    """Redact a (nested) mapping: secret-looking keys lose their value, strings lose URI passwords."""

    def clean(key: str, value: Any) -> Any:
        if _SECRET_KEY.search(key) and value not in (None, ""):
            return REDACTED
        if isinstance(value, Mapping):
            return {k: clean(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(key, v) for v in value]
        return redact(value) if isinstance(value, str) else value

    return {k: clean(str(k), v) for k, v in values.items()}


def redact_yaml_text(text: str) -> str:
    """Redact a YAML file's text, keeping its comments and layout (so the logged file reads as the original)."""
    return _YAML_SECRET_LINE.sub(lambda m: f"{m['head']}'{REDACTED}'", redact(text))


def loggable_params(params: Params) -> dict[str, str]:
    """The flat ``section.key`` params, redacted, as strings (what MLflow stores)."""
    flat = redact_mapping(params_to_flat_dict(params))
    return {k: json.dumps(v, default=_jsonable) if isinstance(v, list | dict) else str(v) for k, v in flat.items()}


def _jsonable(obj: Any) -> Any:
    dump = getattr(obj, "model_dump", None)  # settings objects nested in lists
    return dump(mode="json") if dump else str(obj)
