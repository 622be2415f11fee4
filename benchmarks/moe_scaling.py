"""MoE layer cost as the number of experts grows at fixed activated FLOPs.

`MoEFeedForward` training step (forward + backward, the same jitted
`value_and_grad` step as `moe_layer.py`: loss `sum(y**2) + aux losses`,
gradients w.r.t. all trainable weights and the input) at E in {8, 32, 64}
with the same expert hidden width `h`, so the activated FLOPs per token do not
depend on E: only the router (`d·E`), the capacity per expert
(`C ∝ 1/E`) and the number of (smaller) expert matmuls change.

Routers: top-k with k=2 and k=1 (capacity factor 1.25) and expert choice with
capacity factor 1 and 2. Token counts: 2K (4 x 512) and 16K (32 x 512); one
routing group per sequence (S = 512). A dense FFN (flattened tokens) with the
same activated hidden width (`k·h` or `cf·h`) is timed alongside for context.

Per (tokens, router) the E values and the dense FFN run interleaved, one call
each per round in a rotating order; the reported ratio time(E)/time(E=8) is
the median of the per-round ratios, so load on a shared machine hits all
alike. Target (issue 7): time(E=64) / time(E=8) <= 1.15.

    python benchmarks/moe_scaling.py            # full (minutes on 2 cores)
    python benchmarks/moe_scaling.py --quick    # smoke run
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from machine_peak import matmul_gflops  # noqa: E402
from moe_layer import _time_once  # noqa: E402
from moe_layer import compile_all  # noqa: E402
from moe_layer import make_step  # noqa: E402

from keras_brainformer.layers import FeedForward  # noqa: E402
from keras_brainformer.layers import MoEFeedForward  # noqa: E402

TARGET = 1.15

# name: (router, router options, activated expert slots per token)
ROUTERS = {
    "top-2 cf1.25": ("top_k", {"top_k": 2, "capacity_factor": 1.25}, 2),
    "top-1 cf1.25": ("top_k", {"top_k": 1, "capacity_factor": 1.25}, 1),
    "expert choice cf1": ("expert_choice", {"capacity_factor": 1.0}, 1),
    "expert choice cf2": ("expert_choice", {"capacity_factor": 2.0}, 2),
}


def capacity(router, kwargs, E, S):
    if router == "top_k":
        return math.ceil(kwargs["top_k"] * S * kwargs["capacity_factor"] / E)
    return math.ceil(S * kwargs["capacity_factor"] / E)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--reps", type=int, default=None,
                        help="interleaved rounds (default 7, quick 2)")
    parser.add_argument("--experts", type=int, nargs="+", default=None,
                        help="numbers of experts (default 8 32 64; the first is "
                             "the denominator)")
    parser.add_argument("--routers", nargs="+", default=list(ROUTERS),
                        choices=list(ROUTERS))
    parser.add_argument("--tokens", nargs="+", default=["2k", "16k"],
                        choices=["2k", "16k"])
    args = parser.parse_args()

    S = 512
    # tokens: (sequences of S, d, expert hidden h)
    shapes = {"2k": (4, 512, 1024), "16k": (32, 256, 512)}
    experts = args.experts or [8, 32, 64]
    reps = args.reps or 7
    token_sets = args.tokens
    routers = args.routers
    if args.quick:
        S = 128
        shapes = {"2k": (2, 64, 128), "16k": (4, 64, 128)}
        experts = args.experts or [8, 64]
        reps = args.reps or 2
        token_sets = ["2k"]
        routers = ["top-2 cf1.25"]

    print(f"keras {keras.__version__}, jax {jax.__version__}, devices {jax.devices()}, "
          f"{os.cpu_count()} CPUs; loadavg at start "
          f"{tuple(round(x, 2) for x in os.getloadavg())}", flush=True)
    start = time.time()
    peak_start = matmul_gflops(2048 if not args.quick else 512, 5)
    print(f"float32 matmul peak at start: {peak_start:.1f} GFLOP/s", flush=True)
    rows = []
    for tokens in token_sets:
        G, d, h = shapes[tokens]
        keras.utils.set_random_seed(0)
        x = jnp.asarray(np.random.default_rng(0).standard_normal((G, S, d)), "float32")
        x_flat = jnp.reshape(x, (-1, d))
        dense = {}
        for name in routers:
            router, kwargs, slots = ROUTERS[name]
            print(f"{G * S} tokens ({G} x {S}), d={d}, h={h}, {name}:", flush=True)
            if slots not in dense:
                dense[slots] = make_step(
                    FeedForward(intermediate_dim=slots * h, activation="gelu"), x_flat)
                compile_all({f"dense h={slots * h}": dense[slots]})
            variants = {}
            for E in experts:
                variants[E] = make_step(
                    MoEFeedForward(num_experts=E, intermediate_dim=h, router=router,
                                   **kwargs, activation="gelu"), x)
            compile_all({f"E={E}": v for E, v in variants.items()})
            entries = list(variants.items()) + [("dense", dense[slots])]
            times = {key: [] for key, _ in entries}
            for rep in range(reps):
                shift = rep % len(entries)
                for key, variant in entries[shift:] + entries[:shift]:
                    times[key].append(_time_once(variant))
            base = experts[0]
            for E in experts:
                ratios = [a / b for a, b in zip(times[E], times[base])]
                dense_ratios = [a / b for a, b in zip(times[E], times["dense"])]
                ratio = statistics.median(ratios)
                C = capacity(router, kwargs, E, S)
                rows.append((tokens, G * S, d, h, name, E, C,
                             statistics.median(times[E]), ratio,
                             statistics.median(dense_ratios),
                             statistics.median(times["dense"])))
                print(f"  E={E:>3d} C={C:>4d}: {statistics.median(times[E]):8.1f} ms "
                      f"[{min(times[E]):.1f}-{max(times[E]):.1f}]; / E={base}: "
                      f"{ratio:.3f}; / dense: {statistics.median(dense_ratios):.2f}",
                      flush=True)
            print(f"  dense h={slots * h}: {statistics.median(times['dense']):8.1f} ms",
                  flush=True)
    peak_end = matmul_gflops(2048 if not args.quick else 512, 5)
    print()
    print(f"float32 matmul peak: {peak_start:.1f} GFLOP/s at start, {peak_end:.1f} at end; "
          f"median of {reps} interleaved rounds; S={S} tokens per routing group")
    print()
    print(f"| tokens | d / h | router | E | C | ms (median) | time(E) / time(E={experts[0]}) "
          "| time(E) / dense FFN | dense FFN ms | target | result |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---|---|")
    for tokens, n, d, h, name, E, C, ms, ratio, dense_ratio, dense_ms in rows:
        last = E == experts[-1] and E != experts[0]
        target = f"<= {TARGET}" if last else ""
        result = ("PASS" if ratio <= TARGET else "MISS") if last else ""
        print(f"| {n} | {d} / {h} | {name} | {E} | {C} | {ms:.1f} | {ratio:.3f} "
              f"| {dense_ratio:.2f} | {dense_ms:.1f} | {target} | {result} |")
    print(f"\nloadavg at end {tuple(round(x, 2) for x in os.getloadavg())}; "
          f"whole run {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
