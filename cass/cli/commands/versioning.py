"""`cass data add | remote | push | pull | verify`: DVC around the dataset (cass.versioning). These commands
read no settings beyond what they pass on and never import the training stack."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add(args: argparse.Namespace) -> int:
    """Track a dataset in data.dvc and point params.yaml at it."""
    from cass import versioning

    t = versioning.track_dataset(
        args.path, args.layout, name=args.name, move=args.move, params_file=args.params, overrides=args.overrides
    )
    listed = f"{t.images} images, {len(t.classes)} classes" if t.images is not None else f"{t.nfiles} files"
    print(f"tracked {t.path} in {versioning.DATA_DVC}: {listed}, data version {t.md5}")
    print(f"{args.params}: data.root={t.path}, data.layout={args.layout}")
    print(f"next: git add {versioning.DATA_DVC} {Path(t.path).parent.as_posix()}/.gitignore {args.params} && "
          "git commit; cass data push; dvc repro")
    return 0


def remote(args: argparse.Namespace) -> int:
    """Configure the default S3 remote (URL given) or show it."""
    from cass import versioning

    if args.url:
        r = versioning.configure_remote(
            args.url, name=args.name, endpoint_url=args.endpoint_url, region=args.region, local=args.local
        )
    else:
        r = versioning.get_remote(versioning.project_root())
    print(f"default DVC remote: {r.describe()}")
    return 0


def transfer(args: argparse.Namespace) -> int:
    """`cass data push` and `cass data pull`: the same checks, either direction."""
    from cass import versioning

    verb = versioning.push if args.data_command == "push" else versioning.pull
    summary = verb(args.targets, remote=args.remote, jobs=args.jobs, verify=not args.no_verify)
    print(summary or "nothing to transfer")
    return 0


def verify(args: argparse.Namespace) -> int:
    """Re-hash the cache objects the project refers to; exit 1 when one is corrupted and kept."""
    from cass import versioning

    report = versioning.verify_cache(remove=args.remove)
    print(f"{report.checked} cache objects checked, {report.missing} not in the local cache")
    if report.removed:
        print(f"removed {len(report.corrupted)} corrupted object(s); `cass data pull` fetches good copies "
              "(or `dvc commit --force` where the workspace copy is intact)", file=sys.stderr)
    elif not report.ok:
        print(versioning.corruption_message(report, "corrupted cache"), file=sys.stderr)
        return 1
    return 0
