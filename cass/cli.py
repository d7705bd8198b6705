"""The ``cass`` command line: thin wrappers over the stage functions.

Every command reads ``params.yaml`` (``--params``) and accepts ``--set section.key=value`` overrides,
validated exactly like the file. Errors print one clear message and exit non-zero.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from cass.errors import CassError

log = logging.getLogger("cass")

EPILOG = """examples:
  cass demo                                  # generate the demo data and run every stage on CPU
  cass data prepare --set split.seed=1       # manifest, splits and label-fraction subsets
  cass pretrain --set pretrain.epochs=3      # CASS pretraining of the CNN and the ViT
  cass finetune --network both               # fine-tune both at finetune.label_fraction
  cass evaluate --network cnn                # test metrics, confusion matrix, ROC curves
"""


def _common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("settings")
    g.add_argument("--params", default="params.yaml", metavar="FILE", help="settings file (default: %(default)s)")
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set pretrain.epochs=3 (repeatable; value read as YAML)",
    )
    g.add_argument(
        "--outputs", default="outputs", metavar="DIR", help="root of the stage outputs (default: %(default)s)"
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings and errors only")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cass",
        description="CASS: Cross-Architectural Self-Supervision for medical image classification. A CNN and "
        "a ViT are pretrained together without labels, then each is fine-tuned with few labels.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser(
        "data",
        help="dataset commands: demo, prepare, show",
        description="Generate the demo dataset, build the manifest, show class counts.",
    )
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    p = dsub.add_parser(
        "demo",
        help="generate the embedded demo dataset at data.root",
        description="Write the synthetic tissue-patch dataset (4 classes) as an ImageFolder tree.",
    )
    p.add_argument("--out", metavar="DIR", help="target folder (default: data.root)")
    p.add_argument("--force", action="store_true", help="regenerate even if it is already there")
    _common(p)
    p = dsub.add_parser(
        "prepare",
        help="manifest, splits and label-fraction subsets",
        description="Read the dataset (data.layout), hash and decode every image, assign "
        "stratified seeded splits and write label-fraction subsets to <outputs>/data.",
    )
    _common(p)
    p = dsub.add_parser(
        "show",
        help="class counts per split of the prepared data",
        description="Print the classes, split sizes and data version of <outputs>/data.",
    )
    _common(p)

    p = sub.add_parser(
        "pretrain",
        help="CASS self-supervised pretraining of the CNN and the ViT",
        description="Train both networks on every unlabelled training image with the CASS loss. "
        "Checkpoints each epoch to <outputs>/pretrain and resumes after an interruption.",
    )
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start over")
    _common(p)

    p = sub.add_parser(
        "finetune",
        help="fine-tune the CNN and/or the ViT at a label fraction",
        description="Supervised fine-tuning with focal loss on the finetune.label_fraction subset, "
        "early stopping on validation loss; writes <outputs>/finetune/<network>.",
    )
    p.add_argument(
        "--network",
        choices=["cnn", "vit", "both"],
        default="both",
        help="which network (default: %(default)s = finetune.networks)",
    )
    _common(p)

    p = sub.add_parser(
        "evaluate",
        help="test metrics of fine-tuned networks",
        description="Macro F1, balanced accuracy, per-class scores, AUROC, confusion matrix and "
        "ROC curves on the test split; writes <outputs>/evaluate/<network>.",
    )
    p.add_argument(
        "--network",
        choices=["cnn", "vit", "both"],
        default="both",
        help="which network (default: %(default)s = finetune.networks)",
    )
    _common(p)

    p = sub.add_parser(
        "demo",
        help="run every stage on the embedded demo dataset",
        description="Generate the demo dataset if needed, then prepare, pretrain, fine-tune both "
        "networks and evaluate them, printing the test metrics.",
    )
    _common(p)

    p = sub.add_parser(
        "models",
        help="list timm model names usable as model.cnn / model.vit",
        description="List the timm model names the factory accepts.",
    )
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'resnet*' (default: all)")
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = (
        logging.DEBUG
        if getattr(args, "verbose", False)
        else (logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    )
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )


def _networks(args: argparse.Namespace, params) -> tuple[str, ...]:
    return tuple(params.finetune.networks) if args.network == "both" else (args.network,)


def _print_metrics(results: dict[str, dict]) -> None:
    print(f"\n{'network':8} {'macro F1':>9} {'bal. acc':>9} {'AUROC':>7}  test images")
    for network, m in results.items():
        auroc = m.get("macro_auroc")
        print(
            f"{network:8} {m['macro_f1']:9.3f} {m['balanced_accuracy']:9.3f} "
            f"{auroc if auroc is None else f'{auroc:7.3f}':>7}  {m['num_samples']}"
        )


def run(args: argparse.Namespace) -> int:
    from cass.config import load_params
    from cass.pipeline import Layout

    if args.command == "models":
        import fnmatch

        from cass.models import known_models

        names = [n for n in known_models() if fnmatch.fnmatch(n, args.pattern)]
        print("\n".join(names))
        return 0

    params = load_params(args.params, args.overrides)
    layout = Layout(Path(args.outputs))
    progress = not args.quiet

    if args.command == "data":
        if args.data_command == "demo":
            from cass.data.demo import generate_demo

            out = Path(args.out or params.data.root)
            generate_demo(out, params.data.demo_images_per_class, params.data.demo_image_size, force=args.force)
            print(f"demo dataset at {out}")
        elif args.data_command == "prepare":
            from cass.data.prepare import prepare_data, summarize

            print(summarize(prepare_data(params, layout.data)))
        else:
            from cass.data.prepare import summarize

            print(summarize(layout.data))
        return 0

    if args.command == "pretrain":
        from cass.pretrain import pretrain

        out = pretrain(params, layout.data, layout.pretrain, resume=not args.no_resume, progress=progress)
        print(json.dumps(json.loads(out.metrics.read_text()), indent=2))
        print(f"weights: {out.cnn}, {out.vit}")
        return 0

    if args.command == "finetune":
        from cass.finetune import finetune

        pre = layout.pretrain if params.finetune.init == "cass" else None
        for network in _networks(args, params):
            out = finetune(params, layout.data, network, layout.finetune(network), pre, progress=progress)
            m = json.loads(out.metrics.read_text())
            print(
                f"{network}: best epoch {m['best_epoch']}, val loss {m['best_val_loss']:.4f}, "
                f"val macro F1 {m['best_val_macro_f1']:.3f} -> {out.weights}"
            )
        return 0

    if args.command == "evaluate":
        from cass.evaluate import evaluate

        results = {}
        for network in _networks(args, params):
            out = evaluate(params, layout.data, layout.finetune(network), layout.evaluate(network))
            results[network] = json.loads(out.metrics.read_text())
        _print_metrics(results)
        return 0

    if args.command == "demo":
        from cass.pipeline import run_pipeline

        results = run_pipeline(params, layout, progress=progress, on_stage=lambda s: log.info("== stage: %s", s))
        _print_metrics(results)
        print(f"\noutputs under {layout.root}/: confusion matrices and ROC curves in {layout.root}/evaluate/<network>/")
        return 0
    raise AssertionError(f"unhandled command {args.command}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        return run(args)
    except CassError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
