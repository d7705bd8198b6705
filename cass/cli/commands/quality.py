"""`cass validate manifest | splits | model`: the Great Expectations gates (cass.quality)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cass.cli.settings import networks, outputs, settings
from cass.errors import GateFailed


def validate(args: argparse.Namespace) -> int:
    """Run one gate; print its summary (failures and warnings) and the Data Docs location; exit
    GateFailed.exit_code when a check of severity 'fail' failed."""
    from cass.quality import validate_manifest, validate_model, validate_splits

    params, layout = settings(args), outputs(args)
    report = Path(args.report) if args.report else None
    if args.gate == "manifest":
        results = [validate_manifest(params, layout.data, report or layout.quality("manifest"),
                                     cache_path=layout.decode_cache, raise_on_failure=False)]
    elif args.gate == "splits":
        results = [validate_splits(params, layout.data, report or layout.quality("splits"), raise_on_failure=False)]
    elif args.metrics:
        results = [validate_model(params, Path(args.metrics), report or layout.quality("model"),
                                  raise_on_failure=False)]
    else:
        from cass.pipeline import model_gate

        results = [model_gate(params, layout, network, report) for network in networks(args, params)]
    for result in results:
        print(result.summary(), file=sys.stdout if result.success else sys.stderr)
    return 0 if all(r.success for r in results) else GateFailed.exit_code
