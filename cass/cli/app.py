"""``cass`` = :func:`main`: parse, set up logging, relaunch under torchrun when ``--nproc`` asks, run the
command's handler, and turn a :class:`~cass.errors.CassError` into one message and its exit code.

No credential reaches the console: log records and error messages are redacted (:mod:`cass.redaction`),
and an MLflow error that escaped the tracking code becomes the tracking exit code's one message instead
of a traceback that quotes the tracking URI."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from cass.cli.parser import build_parser
from cass.errors import CassError
from cass.redaction import install_log_redaction, redact
from cass.telemetry import disable_telemetry

DISTRIBUTED_COMMANDS = ("pretrain", "finetune")
QUIET_LIBRARIES = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
"""Library settings of every command, each left alone where the user set it: MLflow draws a "Downloading
artifacts" bar for every model it loads or promotes, which buries `cass promote` and `cass predict` output."""


def _setup_logging(args: argparse.Namespace) -> None:
    level = (
        logging.DEBUG
        if getattr(args, "verbose", False)
        else (logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    )
    fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: rank 0 speaks, the others only on errors
        fmt = f"%(asctime)s [rank {os.environ.get('RANK', '?')}] %(levelname)-7s %(name)s: %(message)s"
        if os.environ.get("RANK", "0") != "0":
            level = max(level, logging.ERROR)
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stderr)
    install_log_redaction()
    if level > logging.DEBUG:  # one "Retrying (...)" line per HTTP retry: cass reports the failure once
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def _tracking_exit_code(exc: Exception) -> int | None:
    """The tracking exit code for an MLflow error no stage turned into a :class:`CassError`, else None."""
    if "mlflow" not in sys.modules:  # nothing tracked in this process
        return None
    from cass.tracking import TrackingError, is_tracking_failure

    return TrackingError.exit_code if is_tracking_failure(exc) else None


def _distributed_launch(args: argparse.Namespace) -> int | None:
    """Re-run this command under torchrun for ``--nproc N``; refuse commands that cannot run in several
    processes. None: go on in this process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.command not in DISTRIBUTED_COMMANDS:
        raise CassError(f"`cass {args.command}` runs in one process; only {' and '.join(DISTRIBUTED_COMMANDS)} "
                        f"run under torchrun (WORLD_SIZE={world})")
    nproc = getattr(args, "nproc", 1)
    if nproc < 1:
        raise CassError(f"--nproc {nproc}: give a number of processes >= 1")
    if nproc > 1 and "RANK" not in os.environ:
        from cass.distributed import launch

        return launch(nproc, args.argv)
    return None


RESUMING_COMMANDS = {
    "pretrain": "rerun the same command to resume after the last finished epoch (its checkpoint in the "
                "pretraining folder)",
    "finetune": "rerun the same command to resume after the last finished epoch (checkpoint.pt in the "
                "fine-tuning folder)",
    "tune": "rerun the same command to continue the study: finished trials are kept in its database",
    "predict": "rerun the same command: the images already written to <output>.parts/ are skipped (with --output)",
    "demo": "rerun the same command: finished stages are reused and an interrupted training resumes after "
            "its last finished epoch",
}


def interrupted_hint(command: str | None) -> str:
    """What a Ctrl-C left and how to go on: only the commands that checkpoint promise a resume; outputs are
    written as whole sets (cass.io), so an interruption leaves the previous ones."""
    return RESUMING_COMMANDS.get(command or "", "outputs on disk are the previous complete ones; rerun the command")


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: the exit status of the command (see cass.errors for the codes)."""
    disable_telemetry()  # before any handler imports MLflow or Prefect
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what torchrun runs again in each process
    _setup_logging(args)
    for name, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(name, value)
    try:
        launched = _distributed_launch(args)
        return args.func(args) if launched is None else launched
    except CassError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        code = _tracking_exit_code(exc)
        if code is None:
            raise
        print(f"error: the MLflow tracking store failed: {redact(f'{type(exc).__name__}: {exc}')}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f"interrupted; {interrupted_hint(args.command)}", file=sys.stderr)
        return 130
    finally:
        if "RANK" in os.environ and "torch.distributed" in sys.modules:
            from cass.distributed import cleanup

            cleanup()
