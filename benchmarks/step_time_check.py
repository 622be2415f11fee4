"""Predicted vs measured train-step time per model family on this machine.

For each family of `training_throughput.py` (same configs, same batch, the
same jitted Keras JAX `train_step` with Adam) this times the step and, right
before each family's steps in every round, the float32 2048³ matmul peak and
the copy bandwidth (`machine_peak.py`). The step-time model
(`keras_brainformer.distribution.step_time`) is evaluated on a `Hardware`
entry built from those same-moment figures, so that load from other jobs on
the shared machine moves the prediction with the measurement. Reported per
family: measured ms (median over rounds), predicted ms (median over rounds),
measured / predicted (median of the per-round ratios), the prediction's two
largest parts, and the ranking of the families by measured and by predicted
time; also each family's step time relative to GLaM (measured as the median
of per-round paired ratios, predicted from the same-moment figures).

    python benchmarks/step_time_check.py --scale tiny
    python benchmarks/step_time_check.py --scale 100m --families brainformer1 brainformer2 glam
    python benchmarks/step_time_check.py --quick     # smoke run (~30 s)
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
from machine_peak import copy_gbps  # noqa: E402
from machine_peak import matmul_gflops  # noqa: E402
from training_throughput import FAMILIES  # noqa: E402
from training_throughput import QUICK_SHAPES  # noqa: E402
from training_throughput import SHAPES  # noqa: E402
from training_throughput import Runner  # noqa: E402
from training_throughput import family_config  # noqa: E402

from keras_brainformer.distribution.hardware import HARDWARE  # noqa: E402
from keras_brainformer.distribution.step_time import predict_step_time  # noqa: E402


def hardware_now(peak_flops, bandwidth):
    """`cpu-here` with the matmul peak and copy bandwidth measured just now."""
    return dataclasses.replace(
        HARDWARE["cpu-here"], name="cpu-now",
        matmul_flops={"float32": peak_flops, "bfloat16": peak_flops},
        memory_bandwidth=bandwidth,
    )


def predict(runner, batch, length, hardware):
    # Keras Adam keeps m and v like AdamW: the "adamw" update traffic.
    return predict_step_time(runner.config, "batch=1", batch, length, hardware,
                             optimizer="adamw", expert_dim_name=None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--scale", choices=["tiny", "100m"], default="tiny")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--rounds", type=int, default=None, help="default 4 (quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="default tiny 3, 100m 1")
    args = parser.parse_args()
    families = ["brainformer1", "glam"] if args.quick else args.families
    batch, length = (QUICK_SHAPES if args.quick else SHAPES)[args.scale]
    rounds = args.rounds or (1 if args.quick else 4)
    steps = args.steps or (1 if args.quick or args.scale == "100m" else 3)
    peak_n, peak_reps, copy_mib = (512, 3, 32) if args.quick else (2048, 3, 256)
    print(f"keras {keras.__version__}, jax {jax.__version__}, {os.cpu_count()} CPUs; loadavg "
          f"at start {tuple(round(x, 2) for x in os.getloadavg())}", flush=True)
    start = time.time()
    runners = []
    for family in families:
        runner = Runner(family, family_config(family, args.scale, length), batch, length)
        runner.run()  # warm up
        runner.predicted, runner.ratios, runner.figures = [], [], []
        runners.append(runner)
        print(f"  built {family}", flush=True)
    for r in range(rounds):
        order = runners[r % len(runners):] + runners[: r % len(runners)]
        for runner in order:
            peak = matmul_gflops(peak_n, peak_reps) * 1e9
            bandwidth = copy_gbps(copy_mib, peak_reps) * 1e9
            plan = predict(runner, batch, length, hardware_now(peak, bandwidth))
            runner.figures.append((peak, bandwidth))
            runner.plan = plan
            for _ in range(steps):
                t = runner.run()
                runner.times.append(t)
                runner.predicted.append(plan.step_seconds)
                runner.ratios.append(t / plan.step_seconds)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{x.family} {x.times[-1] * 1e3:.0f} ms (pred {x.predicted[-1] * 1e3:.0f})"
            for x in order), flush=True)

    peaks = [p for x in runners for p, _ in x.figures]
    bands = [b for x in runners for _, b in x.figures]
    print(f"\n### scale `{args.scale}`: batch {batch} x {length} tokens, {rounds} rounds x "
          f"{steps} steps; same-moment float32 {peak_n}³ matmul "
          f"{statistics.median(peaks) / 1e9:.0f} GFLOP/s (range {min(peaks) / 1e9:.0f}-"
          f"{max(peaks) / 1e9:.0f}), copy bandwidth "
          f"{statistics.median(bands) / 1e9:.1f} GB/s (range {min(bands) / 1e9:.1f}-"
          f"{max(bands) / 1e9:.1f})\n")
    measured = {x.family: statistics.median(x.times) for x in runners}
    predicted = {x.family: statistics.median(x.predicted) for x in runners}
    rank_m = {f: i + 1 for i, f in enumerate(sorted(measured, key=measured.get))}
    rank_p = {f: i + 1 for i, f in enumerate(sorted(predicted, key=predicted.get))}
    anchor = next((x for x in runners if x.family == "glam"), None)
    print("| family | measured ms | predicted ms | measured / predicted | rank measured "
          "| rank predicted | vs glam measured | vs glam predicted | largest predicted parts |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for x in runners:
        parts = sorted(x.plan.parts.items(), key=lambda kv: -kv[1])[:2]
        top = ", ".join(f"{k} {v / x.plan.step_seconds:.0%}" for k, v in parts)
        if anchor is not None:
            per_round_m = [a / g for a, g in zip(x.times, anchor.times)]
            per_round_p = [a / g for a, g in zip(x.predicted, anchor.predicted)]
            vs_m = f"{statistics.median(per_round_m):.2f}"
            vs_p = f"{statistics.median(per_round_p):.2f}"
        else:
            vs_m = vs_p = "-"
        print(f"| {x.family} | {measured[x.family] * 1e3:.1f} | {predicted[x.family] * 1e3:.1f} "
              f"| {statistics.median(x.ratios):.2f} | {rank_m[x.family]} | {rank_p[x.family]} "
              f"| {vs_m} | {vs_p} | {top} |")
    print(f"\nloadavg at end {tuple(round(x, 2) for x in os.getloadavg())}; whole run "
          f"{(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
