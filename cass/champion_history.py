"""The champion of a registered model and the record of every decision about it.

The ``champion`` alias says which version is in production. Aliases keep no history, so every decision
(promoted, refused, restored by a rollback) is recorded on its version as one JSON tag ``promotion.<n>``,
``n`` numbering the decisions of the registered model in order, written BEFORE the alias moves
(:mod:`cass.registry` takes the decisions); :func:`history` reads them back and tells which transitions
moved the alias, and :func:`model_status` is what ``cass registry`` shows.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cass.errors import RegistryError

CHAMPION = "champion"


def mlflow_client():
    import mlflow

    return mlflow.MlflowClient()


HISTORY_TAG = "promotion."
"""Version tags ``promotion.<n>``: one JSON record per decision about the version (promoted, refused, restored
by a rollback), ``n`` numbering the decisions of the whole registered model in order."""
TRANSITIONS = ("promoted", "restored")


@dataclass(frozen=True)
class Decision:
    """One promotion decision, as recorded on its version before the alias moves."""

    seq: int
    version: str
    decision: str  # promoted | refused | restored
    at: str
    by: str
    reason: str
    replaced: str | None = None  # the champion when the decision was taken
    previous_champion: str | None = None  # where a rollback of this version goes
    forced: bool = False
    compared: Mapping[str, Any] = field(default_factory=dict)
    gate_report: str = ""
    applied: bool | None = None  # did the alias move (None: unknown, for a decision kept before history existed)

    def to_json(self) -> str:
        record = {k: v for k, v in self.__dict__.items() if k not in ("version", "applied")}
        return json.dumps(record, sort_keys=True)

    def line(self) -> str:
        what = {"promoted": "promoted", "restored": "restored by rollback", "refused": "refused"}[self.decision]
        if self.decision in TRANSITIONS:
            what += f" (replacing v{self.replaced})" if self.replaced else " (first champion)"
            if self.applied is False:
                what += " [interrupted before the alias moved: not applied]"
        return f"#{self.seq} {self.at} v{self.version} {what} by {self.by}: {self.reason}"


def _records(versions: Sequence[Any]) -> list[Decision]:
    found = []
    for mv in versions:
        for key, value in mv.tags.items():
            if key.startswith(HISTORY_TAG) and key[len(HISTORY_TAG):].isdigit():
                with contextlib.suppress(ValueError, TypeError):
                    found.append(Decision(version=str(mv.version), **json.loads(value)))
    return sorted(found, key=lambda d: d.seq)


def _applied(records: list[Decision], champion: str | None) -> list[Decision]:
    """Mark which transitions moved the alias. Every transition names the champion it replaced, so the chain
    from the current champion back through ``replaced`` is what happened; a transition off the chain was
    recorded and then interrupted before the alias moved (records are written first, see :func:`promote`)."""
    transitions = [d for d in records if d.decision in TRANSITIONS]
    on_chain: set[int] = set()
    current, before, complete = champion, math.inf, champion is None
    while current:
        mine = [d for d in transitions if d.version == current and d.seq < before]
        if not mine:
            break
        last = max(mine, key=lambda d: d.seq)
        on_chain.add(last.seq)
        current, before = last.replaced, last.seq
        complete = not current  # reached the first champion
    floor = 0 if complete else min(on_chain, default=math.inf)
    return [
        d if d.decision not in TRANSITIONS else
        Decision(**{**d.__dict__, "applied": True if d.seq in on_chain else (False if d.seq > floor else None)})
        for d in records
    ]


def history(name: str, client=None) -> tuple[str | None, list[Decision]]:
    """The champion of ``name`` and every promotion decision about its versions, oldest first."""
    from mlflow.exceptions import MlflowException

    client = client or mlflow_client()
    with registry_errors(name, "reading the promotion history"):
        champion = current_champion(client, name)
        try:
            versions = client.search_model_versions(f"name = '{name}'")
        except MlflowException as exc:
            raise RegistryError(f"cannot list versions of {name}: {exc.message}") from None
    return champion, _applied(_records(versions), champion)


def write_record(client, name: str, version: str, decision: Decision) -> None:
    """One tag, one write: a decision is on the version completely or not at all."""
    client.set_model_version_tag(name, version, f"{HISTORY_TAG}{decision.seq}", decision.to_json())


def complete_flat_tags(client, name: str, champion: str | None, records: list[Decision]) -> None:
    """Write the champion's summary tags from its record when a promotion was killed after the alias moved."""
    applied = [d for d in records if d.version == champion and d.applied]
    if not applied:
        return
    last = applied[-1]
    tags = client.get_model_version(name, champion).tags
    if last.decision == "promoted" and tags.get("promoted_at") != last.at:
        set_tags(client, name, champion, promotion_tags(last))
    elif last.decision == "restored" and tags.get("restored_at") != last.at:
        set_tags(client, name, champion, restore_tags(last))
        if last.replaced:
            set_tags(client, name, last.replaced, {"rolled_back_at": last.at, "rollback_reason": last.reason})


def promotion_tags(d: Decision) -> dict[str, str]:
    return {"promoted_at": d.at, "previous_champion": d.replaced or "", "compared_metrics": json.dumps(d.compared),
            "promotion_reason": d.reason, "promotion_forced": str(d.forced).lower(), "promoted_by": d.by,
            "promotion_gate_report": d.gate_report}


def restore_tags(d: Decision) -> dict[str, str]:
    return {"restored_at": d.at, "restored_from": d.replaced or "", "restore_reason": d.reason, "restored_by": d.by}


@contextlib.contextmanager
def registry_errors(name: str, action: str) -> Iterator[None]:
    """Any MLflow failure (server gone, store error, a race the store reports) as a RegistryError (exit 7)."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        message = (getattr(exc, "message", None) or str(exc)).strip().splitlines()[0][:300]
        raise RegistryError(
            f"{name}: {action} failed in the MLflow registry ({exc.error_code}: {message}); the champion is as "
            "the last complete decision left it (`cass registry` shows it); retry when the registry answers"
        ) from None


def current_champion(client, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_registered_model(name).aliases.get(CHAMPION)
        return None if version is None else str(version)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RegistryError(f"registered model '{name}' not found; run the pipeline first") from None


def set_tags(client, name: str, version: str, tags: Mapping[str, Any]) -> None:
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))


@dataclass(frozen=True)
class ModelStatus:
    """A registered model's champion, the decision that made it champion, and every decision about its versions."""

    name: str
    champion: str | None
    made_by: Decision | None  # the applied record that made the champion (None: none kept, see ``tags``)
    tags: Mapping[str, str]  # the champion's tags, for a champion promoted before the history was kept
    history: Sequence[Decision]

    def lines(self) -> list[str]:
        out = [self.name]
        if self.champion is None:
            out.append("  champion: none (`cass promote` makes one)")
        elif self.made_by is not None:
            d = self.made_by
            how = "restored by rollback" if d.decision == "restored" else "forced" if d.forced else "promoted"
            out.append(f"  champion: v{self.champion}, {how} {d.at} by {d.by}")
            out.append(f"  why: {d.reason}")
            if d.gate_report:
                out.append(f"  gate report: {d.gate_report}")
            out.append(f"  rollback goes to: v{d.previous_champion}" if d.previous_champion
                       else "  rollback goes to: nothing (it was the first champion)")
        else:
            t = self.tags
            at = t.get("restored_at") or t.get("promoted_at", "?")
            by = t.get("restored_by") or t.get("promoted_by", "?")
            out.append(f"  champion: v{self.champion}, since {at} by {by}")
            out.append(f"  why: {t.get('restore_reason') or t.get('promotion_reason', 'not recorded')}")
            if t.get("previous_champion"):
                out.append(f"  rollback goes to: v{t['previous_champion']}")
        out.append("  history (oldest first):" if self.history else "  history: no promotion decision recorded")
        out.extend(f"    {d.line()}" for d in self.history)
        return out


def model_status(name: str, client=None) -> ModelStatus:
    client = client or mlflow_client()
    champion, records = history(name, client)
    made = [d for d in records if d.version == champion and d.applied]
    tags: Mapping[str, str] = {}
    if champion is not None and not made:
        with registry_errors(name, "reading the champion"):
            tags = client.get_model_version(name, champion).tags
    return ModelStatus(name, champion, made[-1] if made else None, tags, records)
