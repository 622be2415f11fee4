"""`keras-brainformer compare`: the paper's fixed-wall-clock comparison, as a
study with seeds and intervals.

Every family (a preset name or folder) trains on the same data and gets the
same training time, once per seed. Which architecture reaches the better
validation loss in that time, and how much sooner does it reach another's
final loss?

The clock (`clock=`), said in every output:

- `"paired"` (default): fair on a shared machine. First every family's
  training step is timed *side by side*: `timing_rounds` rounds, in each the
  families run `timing_steps` steps one after another in a rotating order,
  so load from neighbours hits all of them alike. Each family then trains
  for `budget / its median step time` steps, and its curve's time axis is
  steps × that step time. Step counts, not the machine's load during
  training, decide the curves, so reruns give the same curves.
- `"wall"`: each family trains until `budget` seconds of its own measured
  steps have run (the first step, which compiles, is not counted), as the
  paper's fixed wall-clock does on dedicated hardware.

Outputs in the output folder (rerunning the same command continues a
study killed half way with the runs it has; more `--seeds` extend it):

    study.json        the settings (a rerun with others is refused)
    step_times.json   the paired timing (per family and round)
    runs/<family>/seed-<s>.json   one run: curve, final losses, steps
    curves.csv        family, seed, step, seconds, tokens, train_loss, val_loss,
                      and for MoE families the routers' epoch means
                      (router_entropy in nats, load_cv, dropped_fraction)
    runs.csv          one row per (family, seed)
    results.md        per family over seeds, mean and 95 % interval: first
                      the validation loss at equal steps (sample
                      efficiency) and its difference to the reference
                      family's, seed by seed; then, at equal time, the
                      final loss, the step time, the time to reach the
                      target loss and the reference family's final loss
    curves.png        validation loss against steps and against training
                      seconds, a band (min to max over seeds) and the mean
                      per family
"""

import csv
import json
import math
import os
import pathlib
import shutil
import time

import keras
import numpy as np

from keras_brainformer.errors import TrainingError
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.training.callbacks import StepClock
from keras_brainformer.training.config import COMPARE_DEFAULT_FAMILIES
from keras_brainformer.training.config import TrainingConfig
from keras_brainformer.training.study_statistics import equal_steps
from keras_brainformer.training.study_statistics import format_interval
from keras_brainformer.training.study_statistics import interval
from keras_brainformer.training.study_statistics import loss_at
from keras_brainformer.training.study_statistics import loss_band
from keras_brainformer.training.study_statistics import time_to_reach
from keras_brainformer.training.trainer import check_preset
from keras_brainformer.training.trainer import check_sequence_length
from keras_brainformer.training.trainer import check_tokenizer_fits
from keras_brainformer.training.trainer import compile_language_model
from keras_brainformer.training.trainer import load_data
from keras_brainformer.training.trainer import load_tokenizer
from keras_brainformer.training.trainer import preset_model_config
from keras_brainformer.zoo.parameter_count import count_parameters

CLOCKS = ("paired", "wall")
STUDY_FILE = "study.json"
TIMING_FILE = "step_times.json"
CSV_FIELDS = ("family", "seed", "step", "seconds", "tokens", "train_loss", "val_loss",
              "router_entropy", "load_cv", "dropped_fraction")
# The routers' statistics of an MoE family's curve point: `fit`'s epoch
# means (all MoE layers averaged) under the names of the curve.
_ROUTER_LOGS = {"router_entropy": "moe_router_entropy", "load_cv": "moe_load_cv",
                "dropped_fraction": "moe_dropped_fraction"}
# Settings a study can be extended in without invalidating its runs.
_EXTENSIBLE = ("seeds", "target_loss", "reference")


def family_label(preset):
    """The name a family goes by in the outputs: the preset's name, or its
    folder's name."""
    return os.path.basename(os.path.normpath(str(preset)))


class CurveRecorder(StepClock):
    """Times training steps (blocking on each step's loss), records a curve
    point at every epoch end, and stops at `stop_at` seconds of steps. With
    `step_seconds`, a point's time is `steps × step_seconds` (the paired
    clock) instead of the measured seconds."""

    def __init__(self, stop_at, tokens_per_batch, step_seconds=None):
        super().__init__(stop_at=stop_at, stop_on_non_finite=False)
        self.tokens_per_batch = tokens_per_batch
        self.step_seconds = step_seconds
        self.points = []

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        seconds = self.seconds if self.step_seconds is None else self.steps * self.step_seconds
        self.points.append(
            {
                "step": self.steps,
                "seconds": round(seconds, 4),
                "tokens": self.steps * self.tokens_per_batch,
                "train_loss": float(logs.get("loss", math.nan)),
                "val_loss": float(logs.get("val_loss", math.nan)),
                **{key: float(logs[name]) for key, name in _ROUTER_LOGS.items()
                   if name in logs},
            }
        )


def compare_families(
    families=COMPARE_DEFAULT_FAMILIES,
    budget=60.0,
    out="runs/compare",
    config=None,
    *,
    seeds=None,
    eval_every=25,
    clock="paired",
    timing_rounds=5,
    timing_steps=10,
    target_loss=None,
    reference="auto",
    overwrite=False,
    verbose=1,
    steps=None,
    **training,
):
    """Trains each family for `budget` seconds of training per seed (or for
    `steps` steps) on the same data and writes the study's outputs to `out`
    (module docstring).

    Args:
        families: preset names or folders (at least one).
        budget: seconds of training per family and seed.
        out: the output folder.
        config: a `TrainingConfig` (data, tokenizer, batch shape, optimizer,
            learning rate, validation batches). `tokenizer="preset"` (the
            default) needs families with one vocabulary; `"byte"` or
            `"sentencepiece"` lets families of other vocabularies share it.
        seeds: the seeds (initialisation and data order), each family trained
            once per seed; default `(config.seed,)`.
        eval_every: steps between validation points.
        clock: `"paired"` or `"wall"` (module docstring).
        timing_rounds, timing_steps: the paired clock's timing.
        target_loss: the loss whose time to reach is reported; default, per
            seed, the worst family's final loss.
        reference: the family whose final loss the others race to (per
            seed, as a fraction of its training time); `"auto"`: the first
            family whose name starts with `glam`, if any; None: none.
        overwrite: replace a study in `out` made with other settings.
        verbose: 0 silent, 1 progress.
        steps: instead of a time budget, train every family for exactly
            this many steps (equal steps: sample efficiency; the clock
            is then `"steps"`, times are each family's measured steps and
            `budget` is not used).
        **training: `TrainingConfig` fields replacing those of `config`.

    Returns:
        The per-(family, seed) run dicts, in the order trained.
    """
    config = TrainingConfig.create(config, **training)
    families = tuple(str(f) for f in families or ())
    seeds = tuple(seeds) if seeds else (config.seed,)
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise TrainingError(f"`steps` must be a positive integer. Received: steps={steps!r}")
        budget, clock = None, "steps"
    _check_arguments(families, budget, seeds, eval_every, clock, timing_rounds, timing_steps,
                     target_loss)
    labels = [family_label(f) for f in families]
    if len(set(labels)) != len(labels):
        raise TrainingError(f"Two families share a name: {labels}. Rename a preset folder.")
    if reference == "auto":
        reference = next((label for label in labels if label.startswith("glam")), None)
    if reference is not None and reference not in labels:
        raise TrainingError(f"Unknown reference family {reference!r}. Families: {labels}.")
    model_configs = {}
    for preset in families:
        check_preset(preset)
        model_configs[preset] = preset_model_config(preset)
        check_sequence_length(model_configs[preset], config.sequence_length, preset)
    tokenizer = _shared_tokenizer(families, model_configs, config.tokenizer)

    out = pathlib.Path(out)
    study = {
        "families": list(families),
        "budget_seconds": budget,
        "steps": steps,
        "clock": clock,
        "eval_every": eval_every,
        "timing_rounds": timing_rounds,
        "timing_steps": timing_steps,
        "training": {**config.as_dict(), "seed": None},  # the seeds are listed apart
        "seeds": list(seeds),
        "target_loss": target_loss,
        "reference": reference,
        "backend": keras.config.backend(),
    }
    _claim_output_folder(out, study, overwrite)
    data = load_data(config, tokenizer, verbose)

    step_seconds = None
    if clock == "paired":
        timing = _paired_timing(out, families, labels, data, config, timing_rounds, timing_steps,
                                verbose)
        step_seconds = {label: timing[label]["median_seconds"] for label in labels}

    runs = []
    for seed in seeds:
        for preset, label in zip(families, labels):
            path = out / "runs" / label / f"seed-{seed}.json"
            if path.exists():
                with open(path) as f:
                    runs.append(json.load(f))
                if verbose:
                    print(f"{label}, seed {seed}: done earlier ({path})", flush=True)
                continue
            if verbose:
                length = f"{steps} steps" if steps else f"{budget:g} s of training ({clock} clock)"
                print(f"\n=== {label}, seed {seed}: {length} ===", flush=True)
            run_steps = steps
            if step_seconds:  # paired clock: budget / the family's step time
                run_steps = max(1, round(budget / step_seconds[label]))
            run = _train_one(preset, label, seed, data, config, budget, eval_every,
                             step_seconds and step_seconds[label], model_configs[preset],
                             verbose, run_steps)
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_json_atomically(path, run)
            runs.append(run)

    _write_outputs(out, study, runs, labels, seeds, target_loss, reference,
                   step_seconds and timing, verbose)
    return runs


def _check_arguments(families, budget, seeds, eval_every, clock, timing_rounds, timing_steps,
                     target_loss):
    if not families:
        raise TrainingError("`families` is empty: name at least one preset.")
    if clock == "steps":
        pass  # a step count, checked by the caller
    elif isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise TrainingError(f"`budget` must be > 0 seconds. Received: budget={budget!r}")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TrainingError(f"Seeds must be integers. Received: seeds={list(seeds)!r}")
    if len(set(seeds)) != len(seeds):
        raise TrainingError(f"A seed is listed twice: seeds={list(seeds)!r}")
    for name, value in (("eval_every", eval_every), ("timing_rounds", timing_rounds),
                        ("timing_steps", timing_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise TrainingError(f"`{name}` must be a positive integer. Received: {value!r}")
    if clock not in CLOCKS and clock != "steps":
        raise TrainingError(f"Unknown clock {clock!r}. Allowed: 'paired', 'wall'.")
    if target_loss is not None and not (
        isinstance(target_loss, (int, float)) and math.isfinite(target_loss)
        and target_loss > 0
    ):
        raise TrainingError(f"`target_loss` must be a loss > 0. Received: {target_loss!r}")


def _shared_tokenizer(families, model_configs, choice):
    """The one tokenizer every family trains with; refuses families whose
    own vocabularies differ (unless `choice` names a shared tokenizer) or
    whose models cannot embed its ids."""
    if choice == "preset":
        vocabularies = {
            family_label(p): (model_configs[p]["vocabulary_size"],
                              load_tokenizer(p, "preset").vocabulary_size())
            for p in families
        }
        if len(set(vocabularies.values())) != 1:
            described = ", ".join(
                f"{name}: model {model} / tokenizer {tok}"
                for name, (model, tok) in vocabularies.items()
            )
            raise TrainingError(
                "The families do not share one vocabulary, so they cannot train on the same "
                f"tokens ({described}). Use --tokenizer byte (or sentencepiece, for models of "
                "at least 8192 entries) to give them one."
            )
    tokenizer = load_tokenizer(families[0], choice)
    for preset in families:
        try:
            check_tokenizer_fits(tokenizer, model_configs[preset]["vocabulary_size"])
        except TrainingError as error:
            raise TrainingError(f"{family_label(preset)}: {error}") from None
    return tokenizer


def _claim_output_folder(out, study, overwrite):
    path = out / STUDY_FILE
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {str(out)!r} is a file, not a folder.")
    if path.exists():
        with open(path) as f:
            previous = json.load(f)
        differing = sorted(
            k for k in set(previous) | set(study)
            if k not in _EXTENSIBLE and previous.get(k) != study.get(k)
        )
        if differing and not overwrite:
            raise TrainingError(
                f"{str(out)!r} holds a study with other settings (differing: "
                f"{', '.join(differing)}). Use the same settings to continue it (more --seeds "
                "extend it), another --out, or --overwrite."
            )
        if differing:
            shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise TrainingError(
                f"{str(out)!r} is not empty and holds no {STUDY_FILE}. Use another --out, or "
                "--overwrite to replace it."
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomically(path, study)


def _build(preset, seed, config):
    keras.utils.set_random_seed(seed)
    lm = BrainformerCausalLM.from_preset(preset, preprocessor=None)
    # Constant learning rate within the budget (the paper's schedule is
    # constant for its first 10K steps).
    compile_language_model(lm, config.optimizer, config.learning_rate, constant_steps=10**9)
    return lm


def _paired_timing(out, families, labels, data, config, rounds, steps, verbose):
    """Each family's step time measured side by side (reused when saved)."""
    path = out / TIMING_FILE
    if path.exists():
        with open(path) as f:
            timing = json.load(f)
        if verbose:
            print(f"Step times measured earlier ({path}).", flush=True)
        return timing
    if verbose:
        print(f"Timing the training step of {len(families)} families side by side: "
              f"{rounds} rounds of {steps} steps each, rotating order...", flush=True)
    models = {label: _build(p, config.seed, config) for p, label in zip(families, labels)}
    clocks = {label: StepClock(math.inf) for label in labels}
    per_round = {label: [] for label in labels}
    dataset = data.train_dataset(config.batch_size, seed=config.seed)
    for r in range(rounds):
        order = labels[r % len(labels):] + labels[: r % len(labels)]
        for label in order:
            clock = clocks[label]
            before = len(clock.step_times)
            models[label].fit(dataset, epochs=1, steps_per_epoch=steps, callbacks=[clock],
                              verbose=0, shuffle=False)
            per_round[label].append(float(np.median(clock.step_times[before:] or [math.nan])))
        if verbose:
            print(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{label} {1000 * per_round[label][-1]:.1f} ms" for label in labels), flush=True)
    timing = {
        label: {
            "median_seconds": float(np.median(clocks[label].step_times)),
            "round_medians_seconds": per_round[label],
            "steps_timed": len(clocks[label].step_times),
            "compile_seconds": clocks[label].compile_seconds,
        }
        for label in labels
    }
    del models
    keras.backend.clear_session()
    _write_json_atomically(path, timing)
    return timing


def _train_one(preset, label, seed, data, config, budget, eval_every, step_seconds,
               model_config, verbose, steps=None):
    lm = _build(preset, seed, config)
    if steps is not None:  # a step count: the paired clock's, or equal steps
        recorder = CurveRecorder(math.inf, config.tokens_per_batch, step_seconds)
        epochs, last = divmod(steps, eval_every)
        phases = [(eval_every, epochs)] + ([(last, 1)] if last else [])
    else:
        recorder = CurveRecorder(budget, config.tokens_per_batch)
        phases = [(eval_every, 100_000)]  # the budget, not the epoch count, ends it
    validation = data.validation_dataset(config.batch_size, max_batches=config.validation_batches)
    wall = time.perf_counter()
    done = 0
    for epoch_steps, epochs in phases:
        if epochs == 0:
            continue
        lm.fit(
            data.train_dataset(config.batch_size, seed=seed, start_step=done),
            epochs=epochs,
            steps_per_epoch=epoch_steps,
            validation_data=validation,
            callbacks=[recorder],
            verbose=verbose,
            shuffle=False,  # the pipeline's order is the seed's
        )
        done = recorder.steps
    wall = time.perf_counter() - wall
    modes = lm.evaluate_routing_modes(validation, verbose=0, return_dict=True)
    counts = count_parameters(model_config)
    measured_ms = 1000 * float(np.median(recorder.step_times)) if recorder.step_times else math.nan
    seconds = recorder.points[-1]["seconds"] if recorder.points else 0.0
    return {
        "family": label,
        "preset": preset,
        "seed": seed,
        "params": counts["total"],
        "activated_params": counts["activated"],
        "steps": recorder.steps,
        "steps_planned": steps,
        "train_seconds": seconds,
        "step_ms": 1000 * step_seconds if step_seconds is not None else measured_ms,
        "measured_step_ms": measured_ms,
        "compile_seconds": recorder.compile_seconds,
        "wall_seconds": wall,
        "val_loss_causal": float(modes["causal"]["loss"]),
        "val_loss_as_trained": float(modes["as_trained"]["loss"]),
        "curve": recorder.points,
    }


def _write_json_atomically(path, value):
    staging = path.with_name(path.name + ".partial")
    with open(staging, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(staging, path)


# === Results ===


def seed_targets(runs, seeds, target_loss):
    """Per seed, the loss the time-to-reach is measured at: `target_loss`,
    or the worst family's final (causal) loss of that seed."""
    if target_loss is not None:
        return {seed: float(target_loss) for seed in seeds}
    return {
        seed: max(r["val_loss_causal"] for r in runs if r["seed"] == seed) for seed in seeds
    }


def summarise(runs, labels, seeds, target_loss=None, reference=None):
    """Per family, over seeds: intervals of the validation loss at equal
    steps (and its seed-by-seed difference to the reference's), the final
    loss, step time, time to reach the target, and the fraction of the
    reference's time needed to reach the reference's final loss."""
    targets = seed_targets(runs, seeds, target_loss)
    by_key = {(r["family"], r["seed"]): r for r in runs}
    steps = equal_steps([r["curve"] for r in runs]) if all(r["curve"] for r in runs) else []
    rows = []
    for label in labels:
        mine = [by_key[(label, s)] for s in seeds]
        reach = [time_to_reach(r["curve"], targets[r["seed"]]) for r in mine]
        row = {
            "family": label,
            "activated_params": mine[0]["activated_params"],
            "params": mine[0]["params"],
            "val_loss_causal": interval([r["val_loss_causal"] for r in mine]),
            "val_loss_as_trained": interval([r["val_loss_as_trained"] for r in mine]),
            "step_ms": interval([r["step_ms"] for r in mine]),
            "steps": interval([r["steps"] for r in mine]),
            "seconds_to_target": interval(reach),
            # Sample efficiency: the loss after the same number of steps.
            "loss_at_steps": {
                step: interval([float(loss_at(r["curve"], [step])[0]) for r in mine])
                for step in steps
            },
        }
        if reference is not None:
            row["difference_to_reference_at_steps"] = {
                step: interval([
                    float(loss_at(r["curve"], [step])[0]
                          - loss_at(by_key[(reference, r["seed"])]["curve"], [step])[0])
                    for r in mine
                ])
                for step in steps
            }
            fractions = []
            for r in mine:
                ref = by_key[(reference, r["seed"])]
                when = time_to_reach(r["curve"], ref["val_loss_causal"])
                fractions.append(None if when is None else when / ref["train_seconds"])
            row["fraction_of_reference_time"] = interval(fractions)
        rows.append(row)
    return rows, targets


def results_markdown(study, rows, targets, reference, timing):
    seeds = study["seeds"]
    if study["clock"] == "paired":
        clock = (
            "paired clock: each family trained for budget / its step time steps, the step "
            f"times measured side by side ({study['timing_rounds']} rounds × "
            f"{study['timing_steps']} steps, rotating order), time = steps × step time"
        )
    elif study["clock"] == "wall":
        clock = ("wall clock: each family trained for the budget of its own measured step "
                 "time (compilation excluded)")
    else:
        clock = ("equal steps: every family trained the same number of steps, time = its "
                 "own measured steps (compilation excluded)")
    budget = (f"{study['steps']} steps" if study["clock"] == "steps"
              else f"{study['budget_seconds']:g} s of training")
    target = (
        f"the target loss {study['target_loss']:g}"
        if study["target_loss"] is not None
        else "the worst family's final loss in that seed ("
        + ", ".join(f"seed {s}: {targets[s]:.3f}" for s in seeds) + ")"
    )
    training = study["training"]
    lines = [
        f"Budget: {budget} per family and seed; seeds "
        f"{', '.join(map(str, seeds))}; {clock}. Backend {study['backend']}; tokenizer "
        f"{training['tokenizer']}; data {training['data_paths'] or 'the embedded corpus'}; "
        f"batch {training['batch_size']} × {training['sequence_length']} tokens; "
        f"{training['optimizer']} at {training['learning_rate']:g}.",
        "",
        "Each cell: mean over seeds [95 % Student-t interval of the mean]. Validation loss "
        "in nats per token, in causal routing (what generation uses: dropless top-k, also "
        "for expert-choice layers) and as trained (the routing the model trained with; top-k "
        "with a capacity differs from causal only by dropped tokens, dense not at all). "
        "'time to target': "
        f"seconds until the validation curve reaches {target}; (k/n) when only k of n "
        "seeds reached it.",
        "",
    ]
    lines += _equal_steps_table(rows, reference)
    lines += [
        "**At equal time** (the paper's fixed wall-clock):",
        "",
    ]
    header = ["family", "activated / total params", "step time (ms)", "steps",
              "final val loss", "final val loss as trained", "time to target (s)"]
    if reference is not None:
        header.append(f"time to {reference}'s final loss / {reference}'s time")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["family"],
            f"{row['activated_params'] / 1e6:.2f}M / {row['params'] / 1e6:.2f}M",
            format_interval(row["step_ms"], 1),
            format_interval(row["steps"], 0),
            format_interval(row["val_loss_causal"], 3),
            format_interval(row["val_loss_as_trained"], 3),
            format_interval(row["seconds_to_target"], 1),
        ]
        if reference is not None:
            cells.append(format_interval(row["fraction_of_reference_time"], 2))
        lines.append("| " + " | ".join(cells) + " |")
    if timing:
        rounds = {label: timing[label]["round_medians_seconds"] for label in timing}
        lines += ["", "Paired step times (median of each round, ms): " + "; ".join(
            f"{label} " + ", ".join(f"{1000 * t:.1f}" for t in values)
            for label, values in rounds.items()
        ) + "."]
        if reference is not None:
            ref_rounds = timing[reference]["round_medians_seconds"]
            ratios = {
                label: interval([a / b for a, b in zip(timing[label]["round_medians_seconds"],
                                                       ref_rounds)])
                for label in timing if label != reference
            }
            lines.append(f"Step time / {reference}'s, per round: " + "; ".join(
                f"{label} {format_interval(value, 3)}" for label, value in ratios.items()) + ".")
    return "\n".join(lines) + "\n"


def _equal_steps_table(rows, reference):
    steps = list(rows[0]["loss_at_steps"]) if rows else []
    if not steps:
        return []
    header = ["family"] + [f"step {step}" for step in steps]
    if reference is not None:
        header.append(f"− {reference} at step {steps[-1]}")
    lines = [
        "**At equal steps** (sample efficiency): validation loss as `fit` evaluates it, "
        "the same number of training steps (and tokens) for every family"
        + (f"; the last column is the difference to {reference}'s, seed by seed "
           "(negative: ahead of it)." if reference is not None else "."),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [row["family"]] + [format_interval(row["loss_at_steps"][s], 3) for s in steps]
        if reference is not None:
            cells.append(format_interval(row["difference_to_reference_at_steps"][steps[-1]], 3))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _write_outputs(out, study, runs, labels, seeds, target_loss, reference, timing, verbose):
    with open(out / "curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in runs:
            writer.writerows({"family": r["family"], "seed": r["seed"], **p} for p in r["curve"])
    fields = [k for k in runs[0] if k != "curve"]
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: r[k] for k in fields} for r in runs)
    rows, targets = summarise(runs, labels, seeds, target_loss, reference)
    table = results_markdown(study, rows, targets, reference, timing)
    (out / "results.md").write_text(table)
    with open(out / "results.json", "w") as f:
        json.dump({"study": study, "targets": {str(k): v for k, v in targets.items()},
                   "families": rows}, f, indent=2)
    plot_curves(runs, labels, out / "curves.png", study["clock"])
    if verbose:
        print("\n" + table)
        print(f"Wrote {out / 'results.md'}, {out / 'curves.png'}, {out / 'curves.csv'}, "
              f"{out / 'runs.csv'}")


def plot_curves(runs, labels, path, clock):
    import matplotlib  # heavy, for the plot only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for axis, x in zip(axes, ("step", "seconds")):
        for label in labels:
            curves = [r["curve"] for r in runs if r["family"] == label and r["curve"]]
            if not curves:
                continue
            end = min(c[-1][x] for c in curves)
            start = max(c[0][x] for c in curves)
            grid = np.linspace(start, end, 100) if end > start else np.array([end])
            mean, low, high = loss_band(curves, grid, axis=x)
            line, = axis.plot(grid, mean, label=f"{label} ({len(curves)} seeds)")
            if len(curves) > 1:
                axis.fill_between(grid, low, high, color=line.get_color(), alpha=0.2)
        axis.grid(alpha=0.3)
    axes[0].set_xlabel("training steps")
    axes[0].set_title("Equal steps (sample efficiency)")
    axes[0].set_ylabel("validation loss (nats/token)")
    axes[0].legend()
    axes[1].set_xlabel("training seconds" + (" (paired clock)" if clock == "paired" else ""))
    axes[1].set_title("Equal time: mean and min-max band over seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_compare(args):
    compare_families(
        families=tuple(args.families),
        budget=args.budget,
        out=args.out,
        config=TrainingConfig.from_args(args),
        seeds=tuple(args.seeds) if args.seeds else None,
        eval_every=args.eval_every,
        clock=args.clock,
        timing_rounds=args.timing_rounds,
        timing_steps=args.timing_steps,
        target_loss=args.target_loss,
        reference=None if args.reference == "none" else args.reference,
        overwrite=args.overwrite,
        steps=args.steps,
    )
