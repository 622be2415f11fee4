"""Does sparse upcycling pay? A small study from the trained `dense_tiny_stdlib`.

Arms, all on the embedded standard-library corpus, batches of 16 x 128
tokens, Adafactor with the project's schedule (peak 0.01, constant for half
the steps, then 1/sqrt decay), the same step budget each:

- `dense`: continued training of `dense_tiny_stdlib` (6 x [attention, FFN]).
- `glam_up`: upcycled GLaM: the FFN of layers 1, 3, 5 becomes a top-2 MoE of
  8 experts (capacity factor 2, load-balance loss 0.01), experts copied from
  the FFN.
- `bf_up`: upcycled Brainformer-style blocks: 2 x [A, M, A, M, A, F] with
  expert choice (8 experts, capacity factor 2), experts copied (and scaled,
  `expert_choice_scale="compensate"`).
- `glam_scratch`: `glam_up`'s architecture from a random initialisation.

Protocol (the CPU is shared, so wall clock is not the budget): every arm gets
the same number of steps; a paired micro-benchmark (`bench`: the arms'
compiled train steps timed in alternation, several rounds, median) gives
each arm's step time, and the curves are also drawn against the converted
time `step x median step time`.

Stages (each writes into `--out`):

    python examples/upcycling_study.py data            # tokenise once -> data.npz
    python examples/upcycling_study.py step0           # held-out loss before any training
    python examples/upcycling_study.py bench           # paired step-time micro-benchmark
    python examples/upcycling_study.py train --seed 0  # curves_seed0.csv
    python examples/upcycling_study.py report          # curves.csv, curves.png, table.md
"""

import argparse
import csv
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_brainformer.models import BrainformerBackbone  # noqa: E402
from keras_brainformer.models import BrainformerCausalLM  # noqa: E402
from keras_brainformer.models import BrainformerTokenizer  # noqa: E402
from keras_brainformer.models.brainformer.block_spec import AttentionSpec  # noqa: E402
from keras_brainformer.models.brainformer.block_spec import BlockSpec  # noqa: E402
from keras_brainformer.models.brainformer.block_spec import MoESpec  # noqa: E402
from keras_brainformer.training.corpus import LanguageModelData  # noqa: E402
from keras_brainformer.training.corpus import build_language_model_data  # noqa: E402
from keras_brainformer.training.evaluation import heldout_windows  # noqa: E402
from keras_brainformer.training.evaluation import windows_loss  # noqa: E402
from keras_brainformer.training.trainer import compile_language_model  # noqa: E402
from keras_brainformer.zoo.upcycling import glam_target  # noqa: E402
from keras_brainformer.zoo.upcycling import upcycle  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE = "dense_tiny_stdlib"
ARMS = ("dense", "glam_up", "bf_up", "glam_scratch")
SEQUENCE_LENGTH = 128
BATCH_SIZE = 16
# The corpus cap `dense_tiny_stdlib` was trained with: the same split, so
# the validation documents are ones the dense model never saw.
MAX_CORPUS_BYTES = 4_500_000
EXPERTS = 8


def glam_spec(source_config, capacity_factor=2.0):
    return glam_target(
        source_config, EXPERTS, top_k=2, capacity_factor=capacity_factor,
        load_balance_loss_weight=0.01,
    )


def brainformer_spec(source_config, capacity_factor=2.0):
    """2 x [A, M, A, M, A, F]: two of every three FFNs become expert-choice
    MoEs with the FFN's width and activation."""
    attention = AttentionSpec(num_heads=3, head_dim=20)
    ffn = BlockSpec.from_dict(source_config["blocks"]).sublayers[1]
    moe = MoESpec(
        num_experts=EXPERTS, intermediate_dim=ffn.intermediate_dim, activation=ffn.activation,
        router="expert_choice", capacity_factor=capacity_factor,
    )
    return BlockSpec([attention, moe, attention, moe, attention, ffn])


def load_source():
    return BrainformerCausalLM.from_preset(SOURCE)


def make_arm(arm, seed):
    """The arm's causal LM at step 0."""
    keras.utils.set_random_seed(seed)
    source = load_source()
    config = source.backbone.get_config()
    if arm == "dense":
        return source
    if arm == "glam_up":
        return upcycle(source, glam_spec(config), seed=seed)
    if arm == "bf_up":
        return upcycle(source, brainformer_spec(config), seed=seed)
    if arm == "glam_scratch":
        shape = upcycle(source.backbone, glam_spec(config), seed=seed).get_config()
        keras.utils.set_random_seed(seed)
        for key in ("name", "trainable"):
            shape.pop(key, None)
        return BrainformerCausalLM(BrainformerBackbone(**shape), preprocessor=source.preprocessor)
    raise ValueError(arm)


def load_data(out):
    arrays = np.load(out / "data.npz")
    return LanguageModelData(arrays["train"], arrays["validation"], vocabulary_size=8192)


def stage_data(args):
    data = build_language_model_data(
        BrainformerTokenizer(), SEQUENCE_LENGTH, max_bytes=MAX_CORPUS_BYTES, verbose=False
    )
    np.savez(args.out / "data.npz", train=data.train_windows, validation=data.validation_windows)
    print(data.summary())


def stage_step0(args):
    """Held-out loss (first 32 windows of presets/heldout, causal and
    as-trained routing) of each upcycled variant before any training."""
    text = (ROOT / "presets/heldout/stdlib_validation.txt").read_text(encoding="utf-8")
    source = load_source()
    windows = heldout_windows(text, source.preprocessor.tokenizer, SEQUENCE_LENGTH, 32)
    config = source.backbone.get_config()
    rows = [{"model": "dense_tiny_stdlib", "causal": windows_loss(source, windows)}]
    variants = {
        "glam top-2 dropless": (glam_spec(config, None), {}),
        "glam top-2 capacity 2.0": (glam_spec(config), {}),
        "glam top-2 capacity 1.0": (glam_spec(config, 1.0), {}),
        "glam top-2 dropless, zero router": (glam_spec(config, None), {"router_init": "zeros"}),
        "bf expert choice cf 2, compensated": (brainformer_spec(config), {}),
        "bf expert choice cf 2, not compensated": (
            brainformer_spec(config), {"expert_choice_scale": "none"}),
        "bf expert choice cf 2, compensated, zero router": (
            brainformer_spec(config), {"router_init": "zeros"}),
        "bf expert choice cf 1, compensated": (brainformer_spec(config, 1.0), {}),
    }
    for name, (target, kwargs) in variants.items():
        lm = upcycle(source, target, seed=0, **kwargs)
        row = {"model": name, "causal": windows_loss(lm, windows)}
        lm.set_inference_routing("as_trained")
        row["as_trained"] = windows_loss(lm, windows)
        rows.append(row)
        print(row, flush=True)
    (args.out / "step0.json").write_text(json.dumps(rows, indent=2))


def _compiled(arm, seed, steps):
    lm = make_arm(arm, seed)
    lm.preprocessor = None
    compile_language_model(lm, "adafactor", 0.01, max(1, steps // 2), warmup_steps=0)
    return lm


def stage_bench(args):
    """Paired step-time micro-benchmark: the arms' compiled train steps timed
    in alternation (`--rounds` rounds of `--bench-steps` steps each, after
    one warm-up round that compiles); the median per-step time per arm."""
    data = load_data(args.out)
    models = {arm: _compiled(arm, 0, 1000) for arm in ARMS}
    datasets = {arm: iter(data.train_dataset(BATCH_SIZE, seed=0)) for arm in ARMS}
    times = {arm: [] for arm in ARMS}
    for round_index in range(args.rounds + 1):
        for arm in ARMS:
            lm = models[arm]
            batches = [next(datasets[arm]) for _ in range(args.bench_steps)]
            start = time.perf_counter()
            for x, y in batches:
                lm.train_on_batch(x, y)
            per_step = (time.perf_counter() - start) / args.bench_steps
            if round_index:  # round 0 compiles
                times[arm].append(per_step)
        print(round_index, {a: round(t[-1], 4) for a, t in times.items() if t}, flush=True)
    result = {
        arm: {
            "median_step_seconds": statistics.median(t),
            "rounds": t,
            "params": models[arm].backbone.count_params(),
        }
        for arm, t in times.items()
    }
    (args.out / "bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({a: r["median_step_seconds"] for a, r in result.items()}, indent=2))


def stage_train(args):
    data = load_data(args.out)
    validation = data.validation_dataset(BATCH_SIZE, max_batches=args.validation_batches)
    path = args.out / f"curves_seed{args.seed}.csv"
    done = set()
    if path.exists():
        with open(path) as f:
            done = {row["arm"] for row in csv.DictReader(f) if row["step"] == str(args.steps)}
    for arm in args.arms:
        if arm in done:
            continue
        lm = _compiled(arm, args.seed, args.steps)
        points = [(0, lm.evaluate(validation, verbose=0, return_dict=True)["loss"])]
        start = time.perf_counter()
        history = lm.fit(
            data.train_dataset(BATCH_SIZE, seed=args.seed + 100),
            epochs=args.steps // args.eval_every,
            steps_per_epoch=args.eval_every,
            validation_data=validation,
            verbose=0,
        )
        seconds = time.perf_counter() - start
        for i, loss in enumerate(history.history["val_loss"]):
            points.append(((i + 1) * args.eval_every, loss))
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if f.tell() == 0:
                writer.writerow(["arm", "seed", "step", "val_loss", "fit_seconds"])
            for step, loss in points:
                writer.writerow([arm, args.seed, step, f"{loss:.5f}", f"{seconds:.1f}"])
        print(arm, args.seed, [(s, round(v, 4)) for s, v in points], f"{seconds:.0f}s", flush=True)
        if args.save_models:
            lm.preprocessor = load_source().preprocessor
            lm.save_to_preset(str(args.out / "models" / f"{arm}_seed{args.seed}"))


def paired_step_times(out):
    """Each arm's step time from every `bench*.json` in `out`, pooled: the
    dense arm's median step time times the median over rounds of the arm's
    time / the dense arm's time in the same round (paired, so a round slowed
    by other jobs on the machine cancels out)."""
    rounds = {}
    params = {}
    for path in sorted(out.glob("bench*.json")):
        for arm, result in json.loads(path.read_text()).items():
            rounds.setdefault(arm, []).extend(result["rounds"])
            params[arm] = result["params"]
    dense = rounds["dense"]
    return {
        arm: {
            "median_step_seconds": statistics.median(dense)
            * statistics.median(a / b for a, b in zip(times, dense)),
            "ratio_to_dense": statistics.median(a / b for a, b in zip(times, dense)),
            "rounds": len(times),
            "params": params[arm],
        }
        for arm, times in rounds.items()
    }


def stage_report(args):
    bench = paired_step_times(args.out)
    (args.out / "step_times.json").write_text(json.dumps(bench, indent=2))
    rows = []
    for path in sorted(args.out.glob("curves_seed*.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    # Only seeds every arm finished: the means compare the same seeds.
    finished = {}
    for row in rows:
        finished.setdefault(row["seed"], set()).add(row["arm"])
    seeds = {seed for seed, arms in finished.items() if set(ARMS) <= arms}
    rows = [row for row in rows if row["seed"] in seeds]
    curves = {}
    for row in rows:
        curves.setdefault(row["arm"], {}).setdefault(int(row["step"]), []).append(
            float(row["val_loss"])
        )
    with open(args.out / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arm", "step", "converted_seconds", "seeds", "mean_val_loss",
                         "min", "max"])
        for arm, points in curves.items():
            step_time = bench[arm]["median_step_seconds"]
            for step, losses in sorted(points.items()):
                writer.writerow([arm, step, f"{step * step_time:.1f}", len(losses),
                                 f"{np.mean(losses):.4f}", f"{min(losses):.4f}",
                                 f"{max(losses):.4f}"])
    import matplotlib  # optional dependency, only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, points in curves.items():
        steps = sorted(points)
        means = [np.mean(points[s]) for s in steps]
        step_time = bench[arm]["median_step_seconds"]
        by_step.plot(steps, means, marker=".", label=arm)
        by_time.plot([s * step_time for s in steps], means, marker=".", label=arm)
    by_step.set_xlabel("training steps (16 x 128 tokens)")
    by_time.set_xlabel("converted seconds (steps x paired median step time)")
    # Zoom on the arms that start from the dense model; the scratch arm
    # (losses of 6-9) is named in the title instead.
    warm = [np.mean(v) for arm, p in curves.items() if arm != "glam_scratch" for v in p.values()]
    for axis in (by_step, by_time):
        axis.set_ylabel("validation loss, causal (nats/token)")
        axis.set_ylim(min(warm) - 0.01, max(warm) + 0.01)
        axis.grid(alpha=0.3)
        axis.legend()
    scratch = ""
    if "glam_scratch" in curves:
        points = curves["glam_scratch"]
        scratch = (f"; glam_scratch off the chart: {np.mean(points[0]):.2f} -> "
                   f"{np.mean(points[max(points)]):.2f}")
    seeds_text = f"mean over seeds {sorted(seeds)}"
    figure.suptitle(f"Upcycling {SOURCE}: {seeds_text}{scratch}")
    figure.tight_layout()
    figure.savefig(args.out / "curves.png", dpi=110)

    # The table: loss at the last step, and every arm at the dense arm's
    # converted end time (equal extra compute), interpolated.
    dense_end = max(curves["dense"]) * bench["dense"]["median_step_seconds"]
    lines = [
        "| arm | params | step time (s, paired) / ratio to dense | seeds | loss at step 0 | "
        f"loss at step {max(curves['dense'])} (per seed) | mean | loss at {dense_end:.0f} "
        "converted s (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        if arm not in curves:
            continue
        points = curves[arm]
        steps = sorted(points)
        step_time = bench[arm]["median_step_seconds"]
        means = [np.mean(points[s]) for s in steps]
        at_equal = np.interp(dense_end, [s * step_time for s in steps], means)
        last = points[steps[-1]]
        lines.append(
            f"| `{arm}` | {bench[arm]['params'] / 1e6:.2f}M | {step_time:.3f} / "
            f"{bench[arm]['ratio_to_dense']:.2f} | {len(last)} | "
            f"{np.mean(points[0]):.4f} | {', '.join(f'{v:.4f}' for v in last)} | "
            f"{np.mean(last):.4f} | {at_equal:.4f} |"
        )
    table = "\n".join(lines) + "\n"
    (args.out / "table.md").write_text(table)
    print(table)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("data", "step0", "bench", "train", "report"))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/upcycling"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--validation-batches", type=int, default=8)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bench-steps", type=int, default=8)
    parser.add_argument("--save-models", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stages = {"data": stage_data, "step0": stage_step0, "bench": stage_bench,
              "train": stage_train, "report": stage_report}
    stages[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
