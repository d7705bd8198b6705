"""The best-parameters file ``best_<network>.yaml`` and the one way its settings are applied.

``cass tune`` writes it; :func:`tuned_settings` applies it over the settings (what ``cass finetune
--best-params`` and the pipeline's fine-tune stage do, through :func:`cass.stages.finetune_stage`). A pinned
key (``tune.pin``, or a ``--set finetune.<key>``) keeps its value over that file; which values came from
tuning is logged, and tagged on a tracked fine-tune run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cass.config import Params, params_from_mapping
from cass.errors import ConfigError
from cass.io import atomic_write_text
from cass.outputs import best_params_path

log = logging.getLogger(__name__)


def trial_params(params: Params, values: Mapping[str, Any], source: str = "tune trial") -> Params:
    """``params`` with finetune keys replaced by ``values``, validated like params.yaml itself."""
    raw = params.model_dump()
    raw["finetune"].update(values)
    return params_from_mapping(raw, source)


def read_best_params(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: best-parameters file not found; run `cass tune` first or drop --best-params")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("finetune"), dict):
        raise ConfigError(f"{path}: expected a mapping with a 'finetune:' section of settings, as `cass tune` writes")
    return doc


@dataclass(frozen=True)
class TunedSettings:
    """The settings fine-tuning runs with, and which of their values came from a best-parameters file."""

    params: Params
    tuned: dict[str, Any]  # finetune key -> the tuned value now in params
    # finetune key not tuned -> the value now in params: kept by tune.pin here, or the study's pin (the file's
    # ``pinned:``) carried over the settings
    pinned: dict[str, Any]
    source: str  # "<file> (trial <n> of study <name>)"

    def tags(self) -> dict[str, str | None]:
        """MLflow tags of the fine-tune run: ``tuned_from``, and ``tuned_keys`` and ``pinned_keys``
        (comma-separated ``finetune.<key>``; None, so not set, when there is none)."""
        return {
            "tuned_from": self.source,
            "tuned_keys": ",".join(f"finetune.{k}" for k in sorted(self.tuned)) or None,
            "pinned_keys": ",".join(f"finetune.{k}" for k in sorted(self.pinned)) or None,
        }


def tuned_settings(params: Params, path: Path, network: str | None = None) -> TunedSettings:
    """``params`` with the finetune settings of a ``best_<network>.yaml`` file, validated; keys pinned in
    ``tune.pin`` keep the value of ``params``, and the study's own pins (the file's ``pinned:``) that are not
    pinned here apply as the file holds them. Logs which values come from the file and which are pinned."""
    doc = read_best_params(path)
    if network is not None and doc.get("network") not in (None, network):
        raise ConfigError(f"{path}: holds the best settings of the {doc['network']}, not of the {network}")
    pinned = params.tune.pinned
    tuned = {k: v for k, v in doc["finetune"].items() if k not in pinned}
    study_pins = {str(k).removeprefix("finetune."): v for k, v in (doc.get("pinned") or {}).items()}
    # The study's own pins belong to its best settings (every trial ran with them), unless pinned here again.
    carried = {k: v for k, v in study_pins.items() if k not in pinned and k not in tuned}
    kept = {k: getattr(params.finetune, k) for k in dict.fromkeys([*doc["finetune"], *study_pins]) if k in pinned}
    result = trial_params(params, {**tuned, **carried}, f"{path} (best parameters over the settings)")
    origin = f"trial {doc['trial']} of study {doc['study']}" if "trial" in doc and "study" in doc else "tuning"
    source = f"{path} ({origin})"
    who = f"{network}: " if network else ""
    if tuned:
        log.info("%stuned settings from %s: %s", who, source, ", ".join(
            f"finetune.{k}={v!r} (was {getattr(params.finetune, k)!r})" for k, v in sorted(tuned.items())))
    else:
        log.info("%s%s holds no tuned setting; %s", who, path,
                 "only the study's pinned values below apply" if carried else "every value comes from the settings")
    if kept:
        log.info("%spinned by tune.pin, not tuned: %s", who,
                 ", ".join(f"finetune.{k}={v!r}" for k, v in sorted(kept.items())))
    if carried:
        log.info("%spinned in the study, not tuned: %s", who, ", ".join(
            f"finetune.{k}={v!r} (was {getattr(params.finetune, k)!r})" for k, v in sorted(carried.items())))
    return TunedSettings(result, tuned, {**kept, **carried}, source)


def pinned_values(params: Params) -> dict[str, Any]:
    """The pinned keys of the search space and the values they keep, as ``finetune.<key>: value``."""
    return {f"finetune.{k}": getattr(params.finetune, k) for k in params.tune.space if k in params.tune.pinned}


def tuning_origin(path: Path) -> dict[str, Any]:
    """What a fine-tuning records about the best-settings file it took tuned values from (its lineage.json)."""
    return {"file": str(path), **read_best_params(path)}


def write_best_doc(doc: dict[str, Any], network: str, out_dir: Path, origin: str) -> Path:
    header = (
        f"# Best fine-tuning settings of the {network}, found by `cass tune` ({origin}).\n"
        f"# `cass finetune --network {network} --best-params <this file>` applies the finetune: keys over "
        "params.yaml;\n# pinned: the keys tune.pin (or --set) kept out of the search, with the values they keep.\n"
    )
    path = best_params_path(out_dir, network)
    atomic_write_text(path, header + yaml.safe_dump(doc, sort_keys=False))
    return path


def best_params_by_network(files: Sequence[Path], networks: Sequence[str]) -> dict[str, Path]:
    """Match ``--best-params`` files to the networks being fine-tuned, by the network each file names."""
    matched: dict[str, Path] = {}
    for path in map(Path, files):
        network = read_best_params(path).get("network")
        if network is None and len(networks) == 1:
            network = networks[0]
        if network not in networks:
            raise ConfigError(
                f"{path}: holds settings for the {network or 'unnamed network'}, but only "
                f"{', '.join(networks)} is fine-tuned; pass --network {network} or another file"
            )
        if network in matched:
            raise ConfigError(f"{path} and {matched[network]} both hold settings for the {network}; pass one")
        matched[network] = path
    return matched
