"""`keras-brainformer compare`: the paper's fixed-wall-clock comparison, small.

Every family trains for the same wall-clock budget of *training* time (time
spent in training steps; the first step, which compiles, and the periodic
validation are timed separately) on the same data, from the tiny presets
(matched activated parameters). Outputs in the output folder:

    curves.csv    family, step, seconds, tokens, train_loss, val_loss
    curves.png    validation loss against training seconds and against steps
    results.md    step time, tokens/s, compile time, final validation loss
                  (causal and as-trained routing), time to reach the worst
                  family's final loss
"""

import csv
import json
import math
import pathlib
import time

import keras
import numpy as np

from keras_brainformer.errors import TrainingError
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models.brainformer.brainformer_presets import backbone_presets
from keras_brainformer.training.callbacks import StepClock
from keras_brainformer.training.config import TrainingConfig
from keras_brainformer.training.trainer import compile_language_model
from keras_brainformer.training.trainer import load_data
from keras_brainformer.training.trainer import load_tokenizer

DEFAULT_FAMILIES = ("brainformer1_tiny", "glam_tiny", "dense_tiny", "primer_tiny")
CSV_FIELDS = ("family", "step", "seconds", "tokens", "train_loss", "val_loss")


class TrainingClock(StepClock):
    """Times training steps (blocking on each step's loss so asynchronous
    backends are timed honestly), records a curve point at every epoch end,
    and stops training once `budget` seconds of steps have run. The first
    step (tracing and compilation) is timed separately and not counted."""

    def __init__(self, budget, tokens_per_batch):
        super().__init__(stop_at=budget, stop_on_non_finite=False)
        self.budget = budget
        self.tokens_per_batch = tokens_per_batch
        self.points = []

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.points.append(
            {
                "step": self.steps,
                "seconds": round(self.seconds, 4),
                "tokens": self.steps * self.tokens_per_batch,
                "train_loss": float(logs.get("loss", math.nan)),
                "val_loss": float(logs.get("val_loss", math.nan)),
            }
        )


def time_to_reach(points, target):
    """Training seconds at which the validation curve first reaches `target`
    (linear interpolation between evaluation points), or None."""
    previous = None
    for point in points:
        if point["val_loss"] <= target:
            if previous is None or previous["val_loss"] == point["val_loss"]:
                return point["seconds"]
            fraction = (previous["val_loss"] - target) / (
                previous["val_loss"] - point["val_loss"]
            )
            return previous["seconds"] + fraction * (point["seconds"] - previous["seconds"])
        previous = point
    return None


def compare_families(
    families=DEFAULT_FAMILIES,
    budget=60.0,
    out="runs/compare",
    config=None,
    *,
    eval_every=25,
    verbose=1,
    **training,
):
    """Trains each family for `budget` seconds of training steps on the same
    data and writes `curves.csv`, `curves.png` and `results.md` to `out`.

    Args:
        families: preset names or folders.
        budget: seconds of training steps per family.
        out: the output folder.
        config: a `TrainingConfig` (data, tokenizer, batch shape, optimizer,
            seed); `tokenizer="preset"` (the default) needs families sharing
            one vocabulary.
        eval_every: steps between validation points.
        verbose: 0 silent, 1 progress.
        **training: `TrainingConfig` fields replacing those of `config`.

    Returns:
        A list of per-family result dicts (the markdown table's rows).
    """
    config = TrainingConfig.create(config, **training)
    if not families:
        raise TrainingError("`families` is empty: name at least one preset.")
    for name in families:
        if name not in backbone_presets:
            raise TrainingError(
                f"Unknown preset {name!r}. Tiny presets: "
                f"{sorted(n for n in backbone_presets if n.endswith('_tiny'))}."
            )
    if not (isinstance(budget, (int, float)) and budget > 0):
        raise TrainingError(f"`budget` must be > 0 seconds. Received: budget={budget!r}")
    vocabularies = {backbone_presets[n]["config"]["vocabulary_size"] for n in families}
    if len(vocabularies) != 1:
        raise TrainingError(
            f"The families must share one vocabulary to train on the same data; "
            f"got vocabulary sizes {sorted(vocabularies)}."
        )
    sequence_length, batch_size = config.sequence_length, config.batch_size
    learning_rate, optimizer, seed = config.learning_rate, config.optimizer, config.seed
    validation_batches = config.validation_batches

    out = pathlib.Path(out)
    tokenizer = load_tokenizer(families[0], config.tokenizer)
    data = load_data(config, tokenizer, verbose)
    tokens_per_batch = batch_size * sequence_length
    # Enough epochs of `eval_every` steps that the budget, not the epoch
    # count, ends training.
    max_epochs = 100_000

    curves, results = [], []
    for name in families:
        if verbose:
            print(f"\n=== {name}: {budget:g} s of training ===")
        keras.utils.set_random_seed(seed)
        lm = BrainformerCausalLM.from_preset(name, preprocessor=None)
        # Constant learning rate within the budget (the paper's schedule is
        # constant for its first 10K steps).
        compile_language_model(lm, optimizer, learning_rate, constant_steps=10**9)
        clock = TrainingClock(budget, tokens_per_batch)
        wall = time.perf_counter()
        lm.fit(
            data.train_dataset(batch_size, seed=seed),
            epochs=max_epochs,
            steps_per_epoch=eval_every,
            validation_data=data.validation_dataset(batch_size, max_batches=validation_batches),
            callbacks=[clock],
            verbose=verbose,
        )
        wall = time.perf_counter() - wall
        modes = lm.evaluate_routing_modes(
            data.validation_dataset(batch_size, max_batches=validation_batches),
            verbose=0,
            return_dict=True,
        )
        meta = backbone_presets[name]["metadata"]
        step_ms = 1000 * float(np.median(clock.step_times)) if clock.step_times else math.nan
        results.append(
            {
                "family": name,
                "activated_params": meta["activated_params"],
                "params": meta["params"],
                "steps": clock.steps,
                "step_ms": step_ms,
                "tokens_per_second": tokens_per_batch / (step_ms / 1000),
                "compile_seconds": clock.compile_seconds,
                "train_seconds": clock.seconds,
                "wall_seconds": wall,
                "val_loss_causal": float(modes["causal"]["loss"]),
                "val_loss_as_trained": float(modes["as_trained"]["loss"]),
            }
        )
        curves.extend({"family": name, **point} for point in clock.points)

    target = max(r["val_loss_causal"] for r in results)
    per_family_points = {
        r["family"]: [p for p in curves if p["family"] == r["family"]] for r in results
    }
    for r in results:
        r["seconds_to_worst_final_loss"] = time_to_reach(per_family_points[r["family"]], target)

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(curves)
    with open(out / "results.json", "w") as f:
        json.dump(
            {"budget_seconds": budget, "settings": {
                "sequence_length": sequence_length, "batch_size": batch_size,
                "eval_every": eval_every, "learning_rate": learning_rate,
                "optimizer": optimizer, "seed": seed, "backend": keras.config.backend(),
            }, "results": results},
            f,
            indent=2,
        )
    table = results_markdown(results, budget, target)
    with open(out / "results.md", "w") as f:
        f.write(table)
    plot_curves(per_family_points, out / "curves.png")
    if verbose:
        print("\n" + table)
        print(f"Wrote {out / 'curves.csv'}, {out / 'curves.png'}, {out / 'results.md'}")
    return results


def results_markdown(results, budget, target):
    lines = [
        f"Fixed budget: {budget:g} s of training steps per family "
        f"(backend: {keras.config.backend()}). Validation loss in nats/token; "
        "'causal' is the routing generation uses, 'as trained' may look ahead "
        "(expert choice).",
        "",
        "| family | activated / total params | steps | step time (ms) | tokens/s | "
        "compile (s) | val loss causal | val loss as trained | "
        f"s to reach {target:.3f} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        reach = r["seconds_to_worst_final_loss"]
        lines.append(
            f"| {r['family']} | {r['activated_params'] / 1e6:.2f}M / {r['params'] / 1e6:.2f}M | "
            f"{r['steps']} | {r['step_ms']:.1f} | {r['tokens_per_second']:.0f} | "
            f"{r['compile_seconds']:.1f} | {r['val_loss_causal']:.4f} | "
            f"{r['val_loss_as_trained']:.4f} | "
            f"{'-' if reach is None else f'{reach:.1f}'} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(per_family_points, path):
    import matplotlib  # heavy, for the plot only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_time, by_step) = plt.subplots(1, 2, figsize=(11, 4))
    for family, points in per_family_points.items():
        seconds = [p["seconds"] for p in points]
        steps = [p["step"] for p in points]
        losses = [p["val_loss"] for p in points]
        by_time.plot(seconds, losses, marker=".", label=family)
        by_step.plot(steps, losses, marker=".", label=family)
    by_time.set_xlabel("training seconds")
    by_step.set_xlabel("steps")
    for axis in (by_time, by_step):
        axis.set_ylabel("validation loss (nats/token)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("Fixed wall-clock comparison")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_compare(args):
    compare_families(
        families=tuple(args.families),
        budget=args.budget,
        out=args.out,
        config=TrainingConfig.from_args(args),
        eval_every=args.eval_every,
    )
