"""`cass pretrain | finetune | tune | evaluate`: the training stages, one call each to their entry point in
:mod:`cass.stages`, results printed by rank 0; `cass dvc-yaml` writes the dvc.yaml that runs them.

Run by `dvc repro`, each stage first refuses a dvc.yaml that is stale for the settings (:mod:`cass.dvc_yaml`)."""

from __future__ import annotations

import argparse
import json

from cass.cli.output import print_metrics
from cass.cli.settings import networks, outputs, reporting_rank, settings
from cass.dvc_yaml import refuse_stale


def pretrain(args: argparse.Namespace) -> int:
    """CASS (or, with --method dino, DINO) pretraining of both networks into <outputs>/pretrain."""
    from cass.outputs import PretrainOutputs
    from cass.stages import pretrain_stage

    params = settings(args, {"pretrain.method": args.method})
    refuse_stale(params, args.params)
    layout = outputs(args)
    pretrain_stage(params, layout, resume=not args.no_resume, progress=not args.quiet)
    if reporting_rank():
        out = PretrainOutputs(layout.pretrain)
        print(json.dumps(json.loads(out.metrics.read_text()), indent=2))
        print(f"weights: {out.cnn}, {out.vit}")
    return 0


def finetune(args: argparse.Namespace) -> int:
    """Fine-tune each chosen network, with the best settings of `cass tune` where --best-params gives them."""
    from cass.outputs import FinetuneOutputs
    from cass.stages import finetune_stage
    from cass.tuning.best_params import best_params_by_network

    params, layout = settings(args), outputs(args)
    refuse_stale(params, args.params)
    chosen = networks(args, params)
    best = best_params_by_network(args.best_params, chosen)
    for network in chosen:
        ft = finetune_stage(params, layout, network, best_params=best.get(network), progress=not args.quiet)
        if not reporting_rank():
            continue
        out = FinetuneOutputs(ft.out_dir)
        m = json.loads(out.metrics.read_text())
        print(
            f"{network}: best epoch {m['best_epoch']}, val loss {m['best_val_loss']:.4f}, "
            f"val macro F1 {m['best_val_macro_f1']:.3f} -> {out.weights}"
        )
    return 0


def tune(args: argparse.Namespace) -> int:
    """An Optuna study per network, its study and trials logged to MLflow; a --worker only adds trials to the
    shared study."""
    from cass.stages import pretrain_dir, tune_stage
    from cass.tracking.tracker import MlflowTracker
    from cass.tuning import default_worker_index, read_best_params, route_optuna_logging, run_trials

    params = settings(args, {"tune.n_trials": args.n_trials, "tune.timeout": args.timeout,
                             "tune.study_name": args.study})
    refuse_stale(params, args.params)
    layout = outputs(args)
    tracker = MlflowTracker()
    for network in networks(args, params):
        if args.worker:
            route_optuna_logging()
            index = default_worker_index() if args.worker_index is None else args.worker_index
            run_trials(params, layout.data, network, layout.tune, pretrain_dir(params, layout), workers=args.workers,
                       storage=args.storage, worker_index=index, tracker=tracker)
            print(f"{network}: the study has its trials; the main `cass tune` writes the best settings")
            continue
        path = tune_stage(params, layout, network, tracker, workers=args.workers, storage=args.storage)
        doc = read_best_params(path)
        if "trial" not in doc:
            print(f"{network}: nothing to search, every key of tune.space is pinned -> {path}")
            continue
        print(f"{network}: best trial {doc['trial']} of {doc['study']}, {doc['objective']} {doc['value']:.4f} "
              f"-> {path}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Test metrics of each chosen fine-tuned network, printed as one table."""
    from cass.stages import evaluate_stage

    params, layout = settings(args), outputs(args)
    refuse_stale(params, args.params)
    results = {network: dict(evaluate_stage(params, layout, network).metrics) for network in networks(args, params)}
    print_metrics(results)
    return 0


def dvc_yaml(args: argparse.Namespace) -> int:
    """`cass dvc-yaml`: write dvc.yaml from the stage list and the settings file, or --check that it is current."""
    from cass import dvc_yaml as generator
    from cass.errors import ConfigError

    if args.overrides:
        raise ConfigError(f"dvc.yaml follows {args.params} as DVC reads it: set {', '.join(args.overrides)} in "
                          f"{args.params} instead of with --set")
    params = settings(args)
    if args.check:
        reason = generator.stale(params, args.output)
        if reason:
            raise ConfigError(f"{reason}; run `{generator.COMMAND}` to rewrite it from {args.params}")
        print(f"{args.output} is current for {args.params}")
        return 0
    changed = generator.write(params, args.output)
    print(f"{args.output} {'written' if changed else 'already current'} for {args.params}")
    return 0


def list_models(args: argparse.Namespace) -> int:
    """`cass models`: timm's model names (model.cnn / model.vit) matching a shell pattern. timm brings torch."""
    import fnmatch

    from cass.models import known_models

    print("\n".join(n for n in known_models() if fnmatch.fnmatch(n, args.pattern)))
    return 0
