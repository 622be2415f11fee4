"""Forward+backward cost of `MoEFeedForward` relative to its natural baselines.

Measured in one run on the JAX backend (CPU is fine): every variant is built,
its training step `value_and_grad(sum(y**2) + aux losses)` w.r.t. the trainable
weights *and* the input is `jax.jit`-ed through `layer.stateless_call(...,
training=True)`, compiled once, and then timed `--reps` times with the compared
variants interleaved (one call of each per round) so that load on a shared
machine hits all of them alike. Reported times are medians.

Rows per number of experts `E` (top-k routing, `k=2`, capacity factor 1.25,
group = one sequence):

  (a) ours (index dispatch) / dense FFN with the same activated FLOPs
      (`FeedForward(intermediate_dim=k*h)`). Target <= 1.3; the capacity padding
      alone makes it >= ~1.25 (`C = ceil(k*S*cf/E)` slots per expert).
  (a') the same with the dense FFN fed flattened `[B*T, d]` tokens
      (information: a 2-D matmul is faster than a 3-D one on XLA CPU).
  (b) all-experts dense MoE (keras-hub Mixtral style: every expert runs on
      every token, outputs weighted by a dense `[tokens, E]` matrix that is
      zero outside the top-k) / ours. Target: close to `E/k`.
  (c) one-hot einsum dispatch (`dispatch="one_hot"`) / ours (information).

plus, for information, expert choice (`capacity_factor=2.0`) / dense FFN with
hidden `2*h`, and dropless top-k (`capacity_factor=None`, `C = S`) / dense FFN.

Usage:
    python benchmarks/moe_layer.py            # full shapes (minutes on 2 cores)
    python benchmarks/moe_layer.py --quick    # smoke run (seconds)
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import inspect  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402
from machine_peak import matmul_gflops  # noqa: E402

from keras_brainformer.layers import FeedForward  # noqa: E402
from keras_brainformer.layers import MoEFeedForward  # noqa: E402
from keras_brainformer.layers.activations import get_activation  # noqa: E402


class AllExpertsMoE(keras.layers.Layer):
    """Reference "all-experts" MoE (keras-hub Mixtral style).

    Every expert is applied to every token; the expert outputs are summed with
    a dense `[tokens, E]` weight matrix that holds the (renormalised) top-k
    router probabilities and zeros elsewhere. Same weight shapes as
    `ExpertBank`: `w_in [E, d, h]`, `w_out [E, h, d]`, router `[d, E]`.
    Compute is `E/k` times that of the activated experts.
    """

    def __init__(self, num_experts, expert_hidden_dim, k=2, activation="gelu",
                 **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.expert_hidden_dim = expert_hidden_dim
        self.k = k
        self._activation_fn, gated = get_activation(activation)
        if gated:
            raise ValueError("AllExpertsMoE only implements plain activations.")

    def build(self, input_shape):
        d = input_shape[-1]
        E, h = self.num_experts, self.expert_hidden_dim
        self.router_kernel = self.add_weight(
            name="router_kernel", shape=(d, E), initializer="glorot_uniform"
        )
        self.w_in = self.add_weight(
            name="w_in", shape=(E, d, h), initializer="glorot_uniform"
        )
        self.w_out = self.add_weight(
            name="w_out", shape=(E, h, d), initializer="glorot_uniform"
        )

    def call(self, x, training=False):
        shape = ops.shape(x)
        d = shape[-1]
        tokens = ops.reshape(x, (-1, d))  # [T, d]
        probs = ops.softmax(ops.matmul(tokens, self.router_kernel), axis=-1)
        top_w, top_e = ops.top_k(probs, self.k)  # [T, k]
        top_w = top_w / ops.sum(top_w, axis=-1, keepdims=True)
        one_hot = ops.one_hot(top_e, self.num_experts, dtype=top_w.dtype)
        weights = ops.sum(one_hot * top_w[..., None], axis=1)  # [T, E], dense
        hidden = self._activation_fn(
            ops.einsum("td,edh->eth", tokens, self.w_in)
        )
        expert_out = ops.einsum("eth,ehd->etd", hidden, self.w_out)  # [E, T, d]
        out = ops.einsum("etd,te->td", expert_out, weights)
        return ops.reshape(out, shape)


def make_step(layer, x):
    """Builds `layer` on `x` and returns `(jitted_step, args)`.

    The step is the full training-time cost: forward with `training=True`,
    the auxiliary losses the layer adds, and the gradient w.r.t. every
    trainable variable and the input. The non-trainable updates (router
    statistics) are returned too, so XLA cannot drop their computation.
    """
    layer(x)  # build
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    # `FeedForward.call` has no `training` argument (it has no dropout).
    kwargs = {}
    if "training" in inspect.signature(layer.call).parameters:
        kwargs["training"] = True

    def loss_fn(trainable, x, non_trainable):
        y, updates, losses = layer.stateless_call(
            trainable, non_trainable, x, return_losses=True, **kwargs
        )
        loss = jnp.sum(jnp.square(y.astype("float32")))
        for aux in losses:
            loss = loss + aux
        return loss, updates

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

    @jax.jit
    def step(trainable, x, non_trainable):
        (loss, updates), grads = grad_fn(trainable, x, non_trainable)
        return loss, grads, updates

    return step, (trainable, x, non_trainable)


def _block(out):
    jax.tree_util.tree_map(lambda a: a.block_until_ready(), out)


def compile_all(variants, warmup=2):
    """Compiles (and warms up) every `(step, args)` of `variants`."""
    for name, (step, args) in variants.items():
        t0 = time.perf_counter()
        _block(step(*args))
        compile_s = time.perf_counter() - t0
        for _ in range(warmup - 1):
            _block(step(*args))
        print(f"  compiled {name:<14s} in {compile_s:5.1f} s", flush=True)


def _time_once(variant):
    step, args = variant
    t0 = time.perf_counter()
    _block(step(*args))
    return (time.perf_counter() - t0) * 1e3


def time_pair(num, den, reps):
    """Times `num` and `den` back to back, alternating which goes first.

    Returns `(num_ms, den_ms, ratios)`: lists of per-call milliseconds and the
    per-pair ratios `num/den`. A pair runs within a second or a few, so a
    burst of load from other processes on a shared machine mostly hits both
    sides of the same pair; the median of the paired ratios is then far less
    noisy than a ratio of independent medians.
    """
    num_ms, den_ms, ratios = [], [], []
    for rep in range(reps):
        if rep % 2:
            b = _time_once(den)
            a = _time_once(num)
        else:
            a = _time_once(num)
            b = _time_once(den)
        num_ms.append(a)
        den_ms.append(b)
        ratios.append(a / b)
    return num_ms, den_ms, ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small shapes, few repetitions (smoke run)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions per variant (default 10, "
                             "quick: 3)")
    parser.add_argument("--experts", type=int, nargs="+", default=None,
                        help="numbers of experts (default 16 32, quick: 8)")
    args = parser.parse_args()

    if args.quick:
        batch, length, d, h = 2, 64, 64, 128
        experts = args.experts or [8]
        reps = args.reps or 3
        mm_n = 512
    else:
        batch, length, d, h = 8, 512, 512, 1024
        experts = args.experts or [16, 32]
        reps = args.reps or 10
        mm_n = 2048
    k, cf, ec_cf = 2, 1.25, 2.0

    keras.utils.set_random_seed(0)
    x = jnp.asarray(
        np.random.default_rng(0).standard_normal((batch, length, d)), "float32"
    )

    print(f"keras {keras.__version__}, backend {keras.backend.backend()}, "
          f"jax {jax.__version__}, devices {jax.devices()}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(f"shapes: {batch} x {length} tokens, d={d}, expert hidden={h}, "
          f"k={k}, cf={cf}, group=one sequence (S={length}), reps={reps}")
    gflops = matmul_gflops(mm_n, max(reps, 5))
    print(f"float32 matmul {mm_n}x{mm_n}x{mm_n}: {gflops:.1f} GFLOP/s")

    def moe(E, router="top_k", router_options=None, dispatch="index",
            dropless_impl="auto"):
        return MoEFeedForward(
            num_experts=E, intermediate_dim=h, router=router,
            **(router_options or {"top_k": k, "capacity_factor": cf}),
            activation="gelu", dispatch=dispatch, dropless_impl=dropless_impl,
        )

    rows = []  # (E, label, num ms, den ms, ratio, min ratio, target, ok)

    # Dense FFN baselines (shared by all E): same activated FLOPs as top-2 and
    # as expert choice with cf=2 (both 2*h per token).
    dense_hidden = k * h
    ec_hidden = int(round(ec_cf * h))
    for E in experts:
        print(f"E={E}:", flush=True)
        variants = {
            "dense": make_step(FeedForward(intermediate_dim=dense_hidden,
                                           activation="gelu"), x),
            # The same dense FFN fed the flattened `[B*T, d]` tokens: on XLA
            # CPU a 2-D matmul (and its weight gradient) is markedly faster
            # than the 3-D one, so this is the stricter baseline.
            "dense_flat": make_step(FeedForward(intermediate_dim=dense_hidden,
                                                activation="gelu"),
                                    jnp.reshape(x, (-1, d))),
            "ours": make_step(moe(E), x),
            "all_experts": make_step(
                AllExpertsMoE(E, h, k=k, activation="gelu"), x),
            "one_hot": make_step(moe(E, dispatch="one_hot"), x),
            "expert_choice": make_step(
                moe(E, router="expert_choice",
                    router_options={"capacity_factor": ec_cf}), x),
            "dropless": make_step(
                # The slot path (C = S); dropless_blocks.py times the
                # block path that "auto" now picks.
                moe(E, router_options={"top_k": k, "capacity_factor": None},
                    dropless_impl="slots"), x),
        }
        if ec_hidden != dense_hidden:
            variants["dense_ec"] = make_step(
                FeedForward(intermediate_dim=ec_hidden, activation="gelu"), x)
        compile_all(variants)
        C = math.ceil(k * length * cf / E)
        C_ec = math.ceil(length * ec_cf / E)
        comparisons = [
            ("ours", "dense",
             f"(a) ours (index, C={C}) / dense FFN h={dense_hidden}",
             "<= 1.3", lambda r: r <= 1.3),
            ("ours", "dense_flat",
             f"(a') ours / dense FFN h={dense_hidden} on flattened "
             "[B*T, d] tokens", None, None),
            # "Close to E/k": at least 75% of it.
            ("all_experts", "ours", "(b) all-experts dense MoE / ours",
             f"~ E/k = {E // k}", lambda r, E=E: r >= 0.75 * E / k),
            ("one_hot", "ours", "(c) one-hot dispatch / ours", None, None),
            ("expert_choice", "dense_ec" if "dense_ec" in variants else "dense",
             f"expert choice cf={ec_cf} (C={C_ec}) / dense FFN h={ec_hidden}",
             None, None),
            ("dropless", "dense",
             f"top-k dropless (C={length}) / dense FFN h={dense_hidden}",
             None, None),
        ]
        for num, den, label, target, check in comparisons:
            num_ms, den_ms, ratios = time_pair(variants[num], variants[den],
                                               reps)
            ratio = statistics.median(ratios)
            min_ratio = min(num_ms) / min(den_ms)
            ok = None if check is None else check(ratio)
            rows.append((E, label, statistics.median(num_ms),
                         statistics.median(den_ms), ratio, min_ratio, target,
                         ok))
            print(f"  {num:>13s} / {den:<6s} median paired ratio {ratio:6.2f} "
                  f"(IQR {np.percentile(ratios, 25):.2f}-"
                  f"{np.percentile(ratios, 75):.2f}; min/min {min_ratio:.2f}); "
                  f"{num} {statistics.median(num_ms):.1f} ms "
                  f"[{min(num_ms):.1f}-{max(num_ms):.1f}], "
                  f"{den} {statistics.median(den_ms):.1f} ms "
                  f"[{min(den_ms):.1f}-{max(den_ms):.1f}]", flush=True)

    flops = 3 * 2 * 2 * batch * length * d * dense_hidden  # fwd+bwd dense FFN
    print()
    print(f"Context: float32 matmul {gflops:.1f} GFLOP/s; dense FFN step "
          f"~{flops / 1e9:.2f} GFLOP.")
    print()
    print("| E | comparison | numerator ms | denominator ms | ratio "
          "(median of paired) | ratio (min/min) | target | result |")
    print("|---|---|---:|---:|---:|---:|---|---|")
    for E, label, num, den, ratio, min_ratio, target, ok in rows:
        result = "" if ok is None else ("PASS" if ok else "MISS")
        print(f"| {E} | {label} | {num:.1f} | {den:.1f} | {ratio:.2f} | "
              f"{min_ratio:.2f} | {target or 'info'} | {result} |")


if __name__ == "__main__":
    main()
