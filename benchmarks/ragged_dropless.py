"""Dropless top-k MoE: the ragged (grouped-matmul) path vs the slot path vs a
dense FFN of equal activated FLOPs.

One jitted training step per variant (`value_and_grad` of `sum(y**2) + aux
losses` w.r.t. the trainable weights and the input, through
`layer.stateless_call(..., training=True)`), on the JAX backend, all compiled
and warmed up first, then timed in `--reps` interleaved rounds (one call of
each variant per round, the order rotating), so that load on a shared machine
hits all alike. Reported: the median milliseconds per variant and the median
of the per-round ratios.

Variants, per number of experts `E` (top-k, `k=2`, `capacity_factor=None`,
one routing group per sequence):

  dense   `FeedForward(intermediate_dim=k*h)`: the activated FLOPs of top-2.
  slots   `MoEFeedForward(dropless_impl="slots")`: `C = S` slots per expert.
  ragged  `MoEFeedForward(dropless_impl="ragged")`: sort + `jax.lax.ragged_dot`.

Usage:
    python benchmarks/ragged_dropless.py           # 8 x 512 tokens, d=512, h=1024, E=16 32
    python benchmarks/ragged_dropless.py --quick   # smoke run
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from moe_layer import make_step  # noqa: E402

from keras_brainformer.layers import FeedForward  # noqa: E402
from keras_brainformer.layers import MoEFeedForward  # noqa: E402


def run(variant):
    step, args = variant
    t0 = time.perf_counter()
    jax.tree_util.tree_map(lambda a: a.block_until_ready(), step(*args))
    return (time.perf_counter() - t0) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--experts", type=int, nargs="+", default=None)
    args = parser.parse_args()
    if args.quick:
        batch, length, d, h = 2, 64, 64, 128
        experts, reps = args.experts or [8], args.reps or 3
    else:
        batch, length, d, h = 8, 512, 512, 1024
        experts, reps = args.experts or [16, 32], args.reps or 6
    k = 2
    print(f"keras {keras.__version__}, jax {jax.__version__}, "
          f"devices {jax.devices()}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}")
    print(f"shapes: {batch} x {length} tokens, d={d}, expert hidden={h}, k={k}, "
          f"dropless (capacity_factor=None), group=one sequence, reps={reps}")
    keras.utils.set_random_seed(0)
    x = jnp.asarray(
        np.random.default_rng(0).standard_normal((batch, length, d)), "float32"
    )

    def moe(E, impl):
        return MoEFeedForward(
            num_experts=E, intermediate_dim=h, router="top_k",
            top_k=k, capacity_factor=None,
            activation="gelu", dropless_impl=impl,
        )

    for E in experts:
        variants = {
            "dense": make_step(FeedForward(intermediate_dim=k * h, activation="gelu"), x),
            "slots": make_step(moe(E, "slots"), x),
            "ragged": make_step(moe(E, "ragged"), x),
        }
        for name, variant in variants.items():
            t0 = time.perf_counter()
            run(variant)
            run(variant)
            print(f"  E={E}: compiled + 2 warm-up calls of {name} in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        names = list(variants)
        times = {name: [] for name in names}
        for rep in range(reps):
            order = names[rep % 3:] + names[: rep % 3]
            for name in order:
                times[name].append(run(variants[name]))
        def ratio(a, b):
            return statistics.median(x / y for x, y in zip(times[a], times[b]))

        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"E={E}: median ms dense {med['dense']:.1f}, slots "
              f"{med['slots']:.1f}, ragged {med['ragged']:.1f}")
        print(f"E={E}: slots/dense {ratio('slots', 'dense'):.2f}, "
              f"ragged/dense {ratio('ragged', 'dense'):.2f}, "
              f"slots/ragged {ratio('slots', 'ragged'):.2f} "
              "(medians of per-round ratios)", flush=True)


if __name__ == "__main__":
    main()
