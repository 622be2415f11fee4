"""`keras-brainformer search`: the paper's block-wise regularized-evolution
search (see docs/search.md).

    keras-brainformer search --budget-per-trial 60 --trials 40 --out runs/search
    keras-brainformer search --workers 2 ...       # chief + 2 workers, loopback gRPC

Rerunning the same command in the same `--out` resumes the search (raise
`--trials` to extend it). This module imports nothing heavy: the CLI builds
its parser from it for every command.
"""

import argparse

from keras_brainformer.argument_types import positive_float as _positive_float
from keras_brainformer.argument_types import positive_int as _positive_int
from keras_brainformer.search.training_proxy import SEARCH_TOKENIZERS
from keras_brainformer.search.training_proxy import SEARCH_TRAINING
from keras_brainformer.training.config import TrainingConfig


def _scale(text):
    if "/" in text:
        numerator, _, denominator = text.partition("/")
        try:
            return _positive_float(numerator) / _positive_float(denominator)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected a number or a fraction, got {text!r}")
    return _positive_float(text)


def add_arguments(parser):
    """Adds the search's options to an argparse (sub)parser."""
    parser.description = (
        "Regularized-evolution search over 8-sublayer Brainformer blocks (the paper's "
        "Table 1 space, scaled), each trial trained for a fixed wall-clock budget and "
        "constrained against a GLaM-style baseline. Rerun the same command to resume."
    )
    parser.add_argument("--out", default="runs/search", help="search folder")
    parser.add_argument("--budget-per-trial", type=_positive_float, default=60.0,
                        help="seconds of training per trial (compilation excluded)")
    parser.add_argument("--trials", type=_positive_int, default=40,
                        help="trials in all, counting earlier runs in --out")
    parser.add_argument("--population-size", type=_positive_int, default=10)
    parser.add_argument("--tournament-size", type=_positive_int, default=3)
    parser.add_argument("--num-sublayers", type=_positive_int, default=8)
    parser.add_argument("--scale", type=_scale, default=1 / 8,
                        help="factor on Table 1's widths, e.g. 1/8 (CPU proxy) or 1 (paper)")
    parser.add_argument("--gating", nargs="+", choices=("top_2", "expert_choice"),
                        default=["top_2", "expert_choice"],
                        help="gating options searched ('top_2' alone: Search-w-Top2)")
    parser.add_argument("--num-experts", type=_positive_int, default=8)
    parser.add_argument("--num-blocks", type=_positive_int, default=3,
                        help="times a candidate block is stacked")
    TrainingConfig.add_arguments(parser, SEARCH_TRAINING, tokenizers=SEARCH_TOKENIZERS)
    parser.add_argument("--step-time-slack", type=_positive_float, default=1.1,
                        help="a candidate may be this many times slower per step than the "
                        "baseline")
    parser.add_argument("--loss-margin", type=float, default=0.2,
                        help="nats by which a candidate's loss at the check may exceed the "
                        "baseline's")
    parser.add_argument("--check-fraction", type=_positive_float, default=0.25,
                        help="where in the budget the constraint is checked")
    parser.add_argument("--top-k", type=_positive_int, default=3,
                        help="best blocks exported as block specs and presets")
    parser.add_argument("--target-activated", type=_positive_float, default=145e6,
                        help="activated parameters of the paper-size presets")
    parser.add_argument("--workers", type=_positive_int, default=1,
                        help="1: run here; N > 1: launch a chief and N workers (gRPC)")
    parser.add_argument("--oracle-address", default=None,
                        help="where the chief's oracle listens (default 127.0.0.1; "
                        "0.0.0.0 accepts workers from other machines)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing search in --out first")
    parser.add_argument("--remeasure", type=_positive_float, default=None, metavar="SECONDS",
                        help="after the search, train the best block and the GLaM-style and "
                        "dense baselines for SECONDS each and compare (remeasure.md)")
    parser.add_argument("--remeasure-repeats", type=_positive_int, default=1)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args):
    """Runs the search from parsed arguments. Bad input raises `TrainingError`."""
    # The search (Keras, KerasTuner) loads only when the command runs, so the
    # command line's parser stays light.
    from keras_brainformer.search.driver import run_search

    run_search(
        out=args.out,
        budget_per_trial=args.budget_per_trial,
        trials=args.trials,
        config=TrainingConfig.from_args(args),
        population_size=args.population_size,
        tournament_size=args.tournament_size,
        num_sublayers=args.num_sublayers,
        scale=args.scale,
        gating=tuple(args.gating),
        num_experts=args.num_experts,
        num_blocks=args.num_blocks,
        step_time_slack=args.step_time_slack,
        loss_margin=args.loss_margin,
        check_fraction=args.check_fraction,
        top_k=args.top_k,
        target_activated=args.target_activated,
        workers=args.workers,
        oracle_address=args.oracle_address,
        overwrite=args.overwrite,
        remeasure=args.remeasure,
        remeasure_repeats=args.remeasure_repeats,
        verbose=0 if args.quiet else 1,
    )
