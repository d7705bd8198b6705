"""Telling an engineer: a retraining run that failed (or crashed), or whose challenger was refused promotion,
sends one message through a Prefect notification block (``retrain.notify`` in params.yaml).

By default the block is a webhook (Prefect's ``CustomWebhookNotificationBlock``) that POSTs
``{"subject": ..., "text": ..., "source": "cass-retrain"}``, the shape Slack, Mattermost and most chat
webhooks read; its URL comes from ``$CASS_NOTIFY_WEBHOOK_URL`` (``retrain.notify.webhook_url_env``)
because such URLs carry their token, and an optional bearer token from ``$CASS_NOTIFY_WEBHOOK_TOKEN``.
Without a URL nothing is sent. ``retrain.notify.block: <type>/<name>`` uses a block saved on the Prefect
server instead (``prefect block create slack-webhook``, e-mail, Teams, PagerDuty, ...), with its secrets
kept there.

Why flow state hooks (``on_failure``, ``on_crashed``) and a call after promotion, not a Prefect automation:
the hook runs in the flow run's own process, wherever that is (``cass demo`` with its temporary server, a
process worker's subprocess, a Kubernetes job), so it needs nothing registered on the server and cannot be
lost when a temporary server exits with the run; a refused challenger is not a Prefect state at all, and
the flow knows the decision and its reasons at once. What a hook cannot report is a process killed outright
(SIGKILL, out of memory, a lost node): for that, a server-side automation on ``prefect.flow-run.Crashed``
with the same block is the complement (docs/prefect.md).

A notification that cannot be sent is a warning in the run's log, never a change of the run's outcome.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Literal

from cass.config import NotifyConfig
from cass.tracking import redact

log = logging.getLogger("cass.notify")

Event = Literal["failed", "refused"]
SOURCE = "cass-retrain"


def notification_block(cfg: NotifyConfig) -> Any | None:
    """The block that sends: the saved ``cfg.block``, else a webhook to ``$<webhook_url_env>``; None when
    neither is set (nothing to send)."""
    if cfg.block:
        from prefect.blocks.core import Block

        return Block.load(cfg.block)
    url = os.environ.get(cfg.webhook_url_env, "").strip()
    if not url:
        return None
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    token = os.environ.get(cfg.webhook_token_env, "").strip()
    return CustomWebhookNotificationBlock(
        name=SOURCE, url=url, method="POST", timeout=cfg.timeout_s,
        json_data={"subject": "{{subject}}", "text": "{{body}}", "source": "{{name}}"},
        headers={"Authorization": "Bearer {{token}}"} if token else None,
        secrets={"token": token} if token else {},
    )


def notify(cfg: NotifyConfig, event: Event, subject: str, body: str) -> bool:
    """Send ``subject`` and ``body`` when ``event`` is one of ``retrain.notify.events``; True when sent.

    Secrets never reach the message or the log: URI passwords are redacted from the text, and a failure is
    reported without the webhook's URL (it carries the token)."""
    if event not in cfg.events:
        return False
    where = f"the block {cfg.block}" if cfg.block else f"the webhook in ${cfg.webhook_url_env}"
    try:
        block = notification_block(cfg)
        if block is None:
            log.info("no notification sent (%s): set $%s or retrain.notify.block", subject, cfg.webhook_url_env)
            return False
        with block.raise_on_failure():
            block.notify(redact(body), subject=redact(subject))
    except Exception as exc:  # the run's outcome stands whatever the receiver does
        text = redact(str(exc))
        url = os.environ.get(cfg.webhook_url_env, "").strip()
        if url:
            text = text.replace(url, f"${cfg.webhook_url_env}")
        log.warning("could not notify through %s: %s: %s", where, type(exc).__name__, text[:500])
        return False
    log.info("notified through %s: %s", where, subject)
    return True


def flow_run_link(flow_run_id: str) -> str:
    """Where the flow run is shown: the Prefect UI when ``PREFECT_UI_URL`` is known, else its id."""
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else f"flow run {flow_run_id}"


def failed_message(flow_run_name: str, flow_run_id: str, state_name: str, message: str | None) -> tuple[str, str]:
    """The subject and body of a failed (or crashed) run."""
    subject = f"cass retraining {state_name.lower()}: {flow_run_name}"
    body = "\n".join([f"The retraining run {flow_run_name} ended {state_name}.", "", message or "(no message)", "",
                      f"Logs and artifacts: {flow_run_link(flow_run_id)}"])
    return subject, body


def refused_message(flow_run_name: str, flow_run_id: str, refused: Mapping[str, str]) -> tuple[str, str]:
    """The subject and body of a run whose challengers (``network -> decision summary``) were refused."""
    subject = f"cass retraining: challenger refused ({', '.join(refused)}): {flow_run_name}"
    body = "\n".join([f"The retraining run {flow_run_name} registered a challenger that was not promoted:", "",
                      *(f"- {summary}" for summary in refused.values()), "",
                      f"Run summary: {flow_run_link(flow_run_id)}"])
    return subject, body


def notify_refused(cfg: NotifyConfig, promotions: Mapping[str, Any]) -> bool:
    """After promotion, in a flow run: one message naming every challenger that was not promoted."""
    from prefect.runtime import flow_run

    refused = {network: result.summary() for network, result in promotions.items() if not result.promoted}
    if not refused:
        return False
    return notify(cfg, "refused", *refused_message(flow_run.name, str(flow_run.id), refused))


def notify_settings(given: Mapping[str, Any]) -> NotifyConfig:
    """``retrain.notify`` of a flow run with the parameters ``given``: the run's settings, else the settings
    file's (an override may be what failed), else the defaults."""
    from cass.errors import CassError
    from flows.retrain import flow_params

    params_file = given.get("params_file", "params.yaml")
    for overrides in (given.get("overrides") or [], []):
        try:
            return flow_params(params_file, overrides, dataset=given.get("dataset")).retrain.notify
        except (CassError, OSError):
            continue
    return NotifyConfig()


def notify_failed(flow: Any, flow_run: Any, state: Any) -> None:
    """The flow's ``on_failure`` / ``on_crashed`` hook. The settings are the run's own (its parameters);
    when they do not load (the reason it failed, perhaps), those of the settings file, else the defaults."""
    cfg = notify_settings(dict(flow_run.parameters or {}))
    notify(cfg, "failed", *failed_message(flow_run.name, str(flow_run.id), state.name, state.message))
