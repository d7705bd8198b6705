"""`cass data demo | prepare | show`: the dataset the stages read (cass.data)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cass.cli.settings import outputs, settings


def demo_data(args: argparse.Namespace) -> int:
    """Write the synthetic demo dataset to --out or data.root."""
    from cass.data.demo import generate_demo

    params = settings(args)
    out = Path(args.out or params.data.root)
    d = params.data
    if args.dicom:
        from cass.data.dicom_demo import generate_dicom_demo

        generate_dicom_demo(out, d.demo_images_per_class, d.demo_image_size)
        print(f"synthetic DICOM set at {out}")
        return 0
    generate_demo(out, d.demo_images_per_class, d.demo_image_size, force=args.force, kind=d.demo_kind)
    print(f"demo dataset at {out}")
    return 0


def prepare(args: argparse.Namespace) -> int:
    """Manifest, splits and label-fraction subsets into <outputs>/data."""
    from cass.data.manifest import summarize
    from cass.data.prepare import prepare_data

    params = settings(args)
    print(summarize(prepare_data(params, outputs(args).data)))
    return 0


def show(args: argparse.Namespace) -> int:
    """The classes, split sizes and data version of <outputs>/data."""
    from cass.data.manifest import summarize

    params = settings(args)  # a typo in the settings fails here as in every other command
    print(summarize(outputs(args).data, params))
    return 0
