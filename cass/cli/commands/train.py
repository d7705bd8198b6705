"""`cass pretrain | finetune | tune | evaluate`: the training stages, one call each, results printed by rank 0."""

from __future__ import annotations

import argparse
import json

from cass.cli.output import print_metrics
from cass.cli.settings import networks, outputs, reporting_rank, settings


def pretrain(args: argparse.Namespace) -> int:
    """CASS (or, with --method dino, DINO) pretraining of both networks into <outputs>/pretrain."""
    from cass.cass_pretraining import pretrain as run_pretraining

    params = settings(args, {"pretrain.method": args.method})
    layout = outputs(args)
    out = run_pretraining(params, layout.data, layout.pretrain, resume=not args.no_resume, progress=not args.quiet)
    if reporting_rank():
        print(json.dumps(json.loads(out.metrics.read_text()), indent=2))
        print(f"weights: {out.cnn}, {out.vit}")
    return 0


def finetune(args: argparse.Namespace) -> int:
    """Fine-tune each chosen network, with the best settings of `cass tune` where --best-params gives them."""
    from cass.finetune import finetune as run_finetuning
    from cass.tune import apply_best_params, best_params_by_network, tuning_origin

    params, layout = settings(args), outputs(args)
    chosen = networks(args, params)
    best = best_params_by_network(args.best_params, chosen)
    pre = layout.pretrain if params.finetune.init == "cass" else None
    for network in chosen:
        net_params = apply_best_params(params, best[network], network) if network in best else params
        tuning = tuning_origin(best[network]) if network in best else None
        out = run_finetuning(net_params, layout.data, network, layout.finetune(network), pre, progress=not args.quiet,
                             tuning=tuning)
        if not reporting_rank():
            continue
        m = json.loads(out.metrics.read_text())
        print(
            f"{network}: best epoch {m['best_epoch']}, val loss {m['best_val_loss']:.4f}, "
            f"val macro F1 {m['best_val_macro_f1']:.3f} -> {out.weights}"
        )
    return 0


def tune(args: argparse.Namespace) -> int:
    """An Optuna study per network; a --worker only adds trials to the shared study."""
    from cass.tune import default_worker_index, read_best_params, route_optuna_logging, work
    from cass.tune import tune as run_study

    params = settings(args, {"tune.n_trials": args.n_trials, "tune.timeout": args.timeout,
                             "tune.study_name": args.study})
    layout = outputs(args)
    route_optuna_logging()
    pre = layout.pretrain if params.finetune.init == "cass" else None
    for network in networks(args, params):
        if args.worker:
            index = default_worker_index() if args.worker_index is None else args.worker_index
            work(params, layout.data, network, layout.tune, pre, workers=args.workers, storage=args.storage,
                 worker_index=index)
            print(f"{network}: the study has its trials; the main `cass tune` writes the best settings")
            continue
        path = run_study(params, layout.data, network, layout.tune, pre, workers=args.workers, storage=args.storage)
        doc = read_best_params(path)
        if "trial" not in doc:
            print(f"{network}: nothing to search, every key of tune.space is pinned -> {path}")
            continue
        print(f"{network}: best trial {doc['trial']} of {doc['study']}, {doc['objective']} {doc['value']:.4f} "
              f"-> {path}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Test metrics of each chosen fine-tuned network, printed as one table."""
    from cass.evaluate import evaluate as run_evaluation

    params, layout = settings(args), outputs(args)
    results = {}
    for network in networks(args, params):
        out = run_evaluation(params, layout.data, layout.finetune(network), layout.evaluate(network))
        results[network] = json.loads(out.metrics.read_text())
    print_metrics(results)
    return 0


def list_models(args: argparse.Namespace) -> int:
    """`cass models`: timm's model names (model.cnn / model.vit) matching a shell pattern. timm brings torch."""
    import fnmatch

    from cass.models import known_models

    print("\n".join(n for n in known_models() if fnmatch.fnmatch(n, args.pattern)))
    return 0
